"""Benchmark: past one machine (docs/scale.md).

1. Indexing: N images (default 50,000 toy-world images, the bundled toy model,
   fp16 shards) with the local engine (this process and its reading workers)
   and with the ray engine at 1 and 2 workers (a local Ray started for each
   call, as the command line does). Total time (Ray and actor start-up
   included), and the steady rate between the first and the last shard written,
   per worker too; the engine's overhead is the ratio to the local figure.
2. Streaming TextSpan (toy pool, m=5, rank 80) on runs of 20,000 and 200,000
   images, each in a fresh process: peak memory (kernel high-water mark) and time,
   without and with the reconstruction check (which reads the run's labels: O(N)
   strings), locally and on Ray (2 workers, a local Ray). The 200,000-image
   run repeats the 20,000-image run's shards ten times (symbolic links): the
   statistics' memory does not depend on the values (its accuracies are not
   meaningful, its costs are).
3. Search at scale: a FAISS index (``search.RunIndex``) of one head over a
   synthetic run of 1,000,000 x 512 fp16 head rows on disk (clustered data, see
   ``_synthetic``): build time and peak memory in a fresh process, bytes on
   disk, load time of the stored index, query latency, recall@8 against exact
   search for image-like queries (rows of the run, perturbed) and text-like ones
   (random directions).
4. Disk per image per model (the paper's six, from their configs), and a
   projection of indexing time for 1M and 100M images on K workers from the
   measured per-worker rate (section 1), labelled as a projection.

    python bench/scale.py [--only index,textspan,faiss,disk] [--n 50000] [--model toy] [--images SPEC]
                          [--device auto] [--batch-size 64] [--rows 1000000] [--dim 512] [--rate R]

On a GPU node, ``--only index --model open_clip:ViT-B-16@ckpt.pt --images DIR --device cuda
--gpus-per-worker 1`` measures the per-GPU rate the projection needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _child(*args) -> dict:
    """Run this script in a fresh process (``--child ...``) and return the JSON it prints last."""
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ 1. indexing
def _steady_rate(run_dir: Path) -> float:
    """Images per second between the first and the last shard record written."""
    records = sorted((p.stat().st_mtime, len(json.loads(p.read_text())["kept"]))
                     for p in (run_dir / "shards").glob("*.json"))
    if len(records) < 2:
        return float("nan")
    return sum(n for _, n in records[1:]) / max(records[-1][0] - records[0][0], 1e-9)


def child_index(spec, images, out, engine, workers, device, batch_size, gpus) -> dict:
    from clip_interpret import load_model
    from clip_interpret.runstore import index_images

    model = load_model(spec, device=device)
    start = time.perf_counter()
    run = index_images(model, images, out, batch_size=int(batch_size), progress=False, engine=engine,
                       workers=None if workers == "auto" else int(workers), gpus_per_worker=float(gpus))
    seconds = time.perf_counter() - start
    return {"n": len(run), "seconds": seconds, "steady": _steady_rate(Path(out))}


def bench_index(args, tmp: Path) -> dict:
    print(f"1. Indexing {args.images or f'toyworld:{args.n}:1'} with {args.model} on {args.device}")
    images = args.images or f"toyworld:{args.n}:1"
    rows = {}
    configs = [("local", "auto")] + [("ray", w) for w in args.ray_workers.split(",")]
    for engine, workers in configs:
        out = tmp / f"index-{engine}-{workers}"
        result = _child("index", args.model, images, out, engine, workers, args.device, args.batch_size,
                        args.gpus_per_worker)
        local = engine == "local"
        name = "local engine (this process + reading workers)" if local else f"ray engine, {workers} worker(s)"
        per_worker = result["steady"] / (1 if local else int(workers))
        rows[name] = {**result, "per_worker": per_worker}
        print(f"  {name:<48} {result['seconds']:7.1f} s total, {result['n'] / result['seconds']:7.1f} img/s overall, "
              f"steady {result['steady']:7.1f} img/s" + ("" if local else f" ({per_worker:.1f} per worker)"))
        subprocess.run(["rm", "-rf", str(out)], check=True)
    local = next(iter(rows.values()))
    for name, row in list(rows.items())[1:]:
        print(f"  {name}: {row['seconds'] / local['seconds']:.2f}x the local time, "
              f"steady rate {row['steady'] / local['steady']:.2f}x the local one")
    return rows


# -------------------------------------------------------------- 2. TextSpan memory
def child_textspan(run_dir, engine, check) -> dict:
    import warnings

    from clip_interpret import load_model
    from clip_interpret.runstore import open_run
    from clip_interpret.pools import load_pool
    from clip_interpret.textspan import textspan_run

    run = open_run(run_dir)
    model = load_model(run.manifest["model"]["spec"])
    pool = load_pool("toy")
    base = _rss_mb()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        textspan_run(run, model, pool, m=5, rank=80, progress=False, engine=engine,
                     check_ms=(1, 3, 5, 10, 20) if check == "check" else ())
    return {"n": len(run), "seconds": time.perf_counter() - start, "peak_mb": _peak_mb(), "before_mb": base}


def _repeat_run(small: Path, big: Path, times: int) -> None:
    """A run of ``times`` x the images of ``small`` whose shards are links to ``small``'s shards."""
    from clip_interpret.runstore import open_source
    from clip_interpret.runstore.store import atomic_write_json

    manifest = json.loads((small / "manifest.json").read_text())
    n_small = manifest["n_indexed"]
    source = open_source(f"toyworld:{n_small * times}:1")
    (big / "shards").mkdir(parents=True)
    atomic_write_json(big / "images.json", {"names": source.names, "labels": source.labels})
    records = sorted((small / "shards").glob("*.json"))
    size = manifest["shard_size"]
    for r in range(times):
        for record in records:
            info = json.loads(record.read_text())
            shard = r * len(records) + info["shard"]
            start = shard * size
            info.update(shard=shard, start=start, stop=start + len(info["kept"]),
                        kept=list(range(start, start + len(info["kept"]))))
            for kind in ("pieces", "emb"):
                (big / "shards" / f"{shard:05d}.{kind}.npy").symlink_to(
                    small / "shards" / f"{info['shard'] - r * len(records):05d}.{kind}.npy")
            atomic_write_json(big / "shards" / f"{shard:05d}.json", info)
    manifest.update(source=source.describe(), n_indexed=len(source), n_failed=0)
    atomic_write_json(big / "manifest.json", manifest)


def bench_textspan(args, tmp: Path) -> dict:
    from clip_interpret import load_model
    from clip_interpret.runstore import index_images

    n = args.textspan
    print("\n2. Streaming TextSpan (toy pool, m=5, rank 80), a fresh process each")
    small = tmp / f"toy-{n}"
    index_images(load_model("toy"), f"toyworld:{n}:1", small, shard_size=1000, progress=False)
    big = tmp / f"toy-{10 * n}"
    _repeat_run(small, big, 10)
    rows = {}
    for run_dir, engine, check in ((small, "local", "-"), (big, "local", "-"), (small, "local", "check"),
                                   (big, "local", "check"), (big, "ray", "check")):
        result = _child("textspan", run_dir, engine, check)
        what = "with the reconstruction check" if check == "check" else "statistics and picks only"
        rows[f"{result['n']} {engine} {check}"] = result
        print(f"  {result['n']:>8,} images, {engine:<5}, {what:<30}: peak {result['peak_mb']:6.0f} MB "
              f"(model and imports loaded: {result['before_mb']:.0f} MB), {result['seconds']:6.1f} s")
    return rows


# -------------------------------------------------------------------- 3. FAISS
def _synthetic(folder: Path, rows: int, dim: int, shard: int = 10_000, seed: int = 0) -> None:
    """A valid run of one layer with one head, ``rows`` images of ``dim`` dims (fp16 pieces
    [rows, 5, dim]: the head, then the layer's bias, MLP, CLS embedding and constant pieces,
    all zero; zero embeddings). The head's rows: 1,000 cluster centres in a 64-dimensional
    subspace (N(0, 1) coordinates), each row its centre plus N(0, 0.5^2) within the subspace
    plus N(0, 0.05^2) in every dimension (head contributions are low-rank and clustered)."""
    from clip_interpret.runstore.store import atomic_save_npy, atomic_write_json, piece_layout

    layout = piece_layout([0], [], 1, 1)
    n_pieces = max(stop for _, stop in layout.values())
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 64)))[0].T.astype(np.float32)  # [64, dim] orthonormal
    centres = rng.normal(size=(1000, 64)).astype(np.float32)
    (folder / "shards").mkdir(parents=True)
    for s, start in enumerate(range(0, rows, shard)):
        stop = min(rows, start + shard)
        latent = centres[rng.integers(0, 1000, stop - start)] + 0.5 * rng.normal(size=(stop - start, 64))
        x = latent.astype(np.float32) @ basis + 0.05 * rng.normal(size=(stop - start, dim)).astype(np.float32)
        pieces = np.zeros((stop - start, n_pieces, dim), np.float16)
        pieces[:, 0] = x
        atomic_save_npy(folder / "shards" / f"{s:05d}.pieces.npy", pieces)
        atomic_save_npy(folder / "shards" / f"{s:05d}.emb.npy", np.zeros((stop - start, dim), np.float32))
        atomic_write_json(folder / "shards" / f"{s:05d}.json",
                          {"shard": s, "start": start, "stop": stop, "kept": list(range(start, stop)), "failures": []})
    atomic_write_json(folder / "images.json", {"names": [f"synthetic:{i}" for i in range(rows)], "labels": {}})
    atomic_write_json(folder / "manifest.json", {
        "version": 1, "model": {"spec": "synthetic", "fingerprint": f"synthetic-{seed}"}, "preprocess": {},
        "source": {"spec": "synthetic", "kind": "synthetic", "n": rows, "hash": f"synthetic-{rows}-{dim}-{seed}"},
        "layers": [0], "other_layers": [], "n_layers": 1, "n_heads": 1, "dim": dim, "dtype": "fp16",
        "shard_size": shard, "layout": layout, "complete": True})


def _queries(run, n: int = 100, seed: int = 1) -> np.ndarray:
    from clip_interpret.search import HeadSet

    rng = np.random.default_rng(seed)
    rows = HeadSet(run, ["L0.H0"]).gather(rng.choice(len(run), n, replace=False))
    image_like = rows + 0.05 * rng.normal(size=rows.shape).astype(np.float32)
    text_like = rng.normal(size=(n, run.dim)).astype(np.float32)
    return np.concatenate([image_like, text_like / np.linalg.norm(text_like, axis=1, keepdims=True)])


def child_faiss(run_dir, stage) -> dict:
    from clip_interpret.runstore import open_run
    from clip_interpret.search import HeadSet, RunIndex

    run = open_run(run_dir)
    base = _rss_mb()
    start = time.perf_counter()
    index = RunIndex(HeadSet(run, ["L0.H0"]))
    seconds = time.perf_counter() - start
    result = {"kind": index.kind, "seconds": seconds, "peak_added_mb": _peak_mb() - base,
              "bytes": index.path.stat().st_size, "nprobe": index.index.nprobe}
    if stage == "query":
        queries = _queries(run)
        truth = np.load(Path(run_dir) / "truth.npy")
        for nprobe in (index.index.nprobe, 2 * index.index.nprobe):
            index.index.nprobe = nprobe
            times, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                found.append(index.search(q, 8)[0])
                times.append(time.perf_counter() - t0)
            hits = [len(set(f.tolist()) & set(t.tolist())) / 8 for f, t in zip(found, truth)]
            half = len(queries) // 2
            result.setdefault("queries", {})[nprobe] = {"ms": 1000 * float(np.median(times)),
                                                        "recall_image": float(np.mean(hits[:half])),
                                                        "recall_text": float(np.mean(hits[half:]))}
    return result


def _truth(run, queries: np.ndarray, k: int = 8) -> np.ndarray:
    """Exact top-k of every query, by streaming the shards once."""
    import torch

    from clip_interpret.search import HeadSet

    best_idx = np.zeros((len(queries), 0), np.int64)
    best = np.zeros((len(queries), 0), np.float32)
    q = torch.from_numpy(queries)
    for first, vectors in HeadSet(run, ["L0.H0"]).blocks():
        scores = (torch.from_numpy(vectors) @ q.T).numpy().T  # [Q, S]
        idx = np.concatenate([best_idx, np.arange(first, first + vectors.shape[0])[None].repeat(len(q), 0)], axis=1)
        scores = np.concatenate([best, scores], axis=1)
        top = np.argsort(-scores, axis=1)[:, :k]
        best_idx, best = np.take_along_axis(idx, top, 1), np.take_along_axis(scores, top, 1)
    return best_idx


def bench_faiss(args, tmp: Path) -> dict:
    from clip_interpret.runstore import open_run

    print(f"\n3. FAISS index of one head, synthetic run of {args.rows:,} x {args.dim} (fp16 shards on disk)")
    folder = tmp / "synthetic"
    start = time.perf_counter()
    _synthetic(folder, args.rows, args.dim)
    print(f"  wrote the run in {time.perf_counter() - start:.0f} s "
          f"({sum(p.stat().st_size for p in (folder / 'shards').glob('*.npy')) / 1e9:.2f} GB)")
    run = open_run(folder)
    start = time.perf_counter()
    np.save(folder / "truth.npy", _truth(run, _queries(run)))
    print(f"  exact top-8 of 200 queries by streaming the shards: {time.perf_counter() - start:.0f} s")
    built = _child("faiss", folder, "build")
    print(f"  built {built['kind']} in {built['seconds']:.0f} s, peak memory added {built['peak_added_mb']:.0f} MB "
          f"(a float32 copy of the head would be {args.rows * args.dim * 4 / 2**20:.0f} MB), "
          f"{built['bytes'] / args.rows:.0f} bytes a row on disk ({built['bytes'] / 2**20:.0f} MB)")
    used = _child("faiss", folder, "query")
    print(f"  stored index loaded in {used['seconds']:.1f} s (reused, not rebuilt)")
    for nprobe, row in used["queries"].items():
        print(f"  nprobe {nprobe}, 256 candidates re-ranked exactly: {row['ms']:.1f} ms a query, recall@8 "
              f"{row['recall_image']:.3f} (image-like queries), {row['recall_text']:.3f} (text-like)")
    return {"build": built, "query": used}


# -------------------------------------------------------------- 4. disk, projection
def bench_disk(index_rows: dict | None, rate: float | None = None) -> dict:
    import open_clip

    from clip_interpret.decompose import resolve_layers
    from clip_interpret.runstore.store import piece_layout
    from clip_interpret.models import PAPER_MODELS

    print("\n4. Disk per image (fp16 pieces + fp32 embedding; shard records add ~8 bytes), default layers (last 4)")
    sizes = {}
    for spec in PAPER_MODELS:
        arch = spec.split(":", 1)[1].split("/")[0]
        cfg = open_clip.get_model_config(arch)
        vision = cfg["vision_cfg"]
        layers, dim = vision["layers"], cfg["embed_dim"]
        heads = vision["width"] // vision.get("head_width", 64)
        chosen = resolve_layers(None, layers)
        others = [i for i in range(layers) if i not in chosen]
        pieces = max(stop for _, stop in piece_layout(chosen, others, layers, heads).values())
        sizes[spec] = pieces * dim * 2 + dim * 4
        print(f"  {spec:<40} {pieces:>3} pieces x {dim} dims: {sizes[spec] / 1e3:6.1f} kB/image, "
              f"{sizes[spec] * 1e6 / 1e9:6.0f} GB per million images")
    if index_rows:
        ray_rows = [r for name, r in index_rows.items() if name.startswith("ray")]
        rate = ray_rows[-1]["per_worker"] if ray_rows else next(iter(index_rows.values()))["steady"]
    if rate:
        print(f"\n  PROJECTION from the measured per-worker rate {rate:.0f} img/s (section 1, or --rate from an "
              "earlier run of it; linear scaling assumed, start-up excluded):")
        for k in (1, 8, 64):
            print(f"    K={k:<3} workers: 1M images {1e6 / (k * rate) / 3600:8.2f} h, "
                  f"100M images {1e8 / (k * rate) / 3600:9.1f} h")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="index,textspan,faiss,disk")
    parser.add_argument("--n", type=int, default=50_000, help="toy images to index (section 1)")
    parser.add_argument("--images", default=None, help="image source for section 1 (default toyworld:N:1)")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ray-workers", default="1,2", help="Ray worker counts to measure (section 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--textspan", type=int, default=20_000, help="images of the smaller TextSpan run")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rate", type=float, default=None,
                        help="per-worker img/s for the projection (section 4) when section 1 is not run")
    parser.add_argument("--tmp", default=None, help="work folder (default: a temporary folder)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        print(json.dumps({"index": child_index, "textspan": child_textspan, "faiss": child_faiss}[what](*rest)))
        return

    import torch

    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start")
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        index_rows = bench_index(args, tmp) if "index" in only else None
        if "textspan" in only:
            bench_textspan(args, tmp)
        if "faiss" in only:
            bench_faiss(args, tmp)
        if "disk" in only:
            bench_disk(index_rows, args.rate)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
