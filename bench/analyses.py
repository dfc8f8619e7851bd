"""Benchmark: latency of the five analyses, and nearest-neighbour search at scale (CPU).

1. Each analysis on the bundled toy model over a toy-world run of N images (default
   10,000; built once under out/bench/, then reused), after warm-up: median of R calls,
   the way the web app serves them (model loaded once, the run's head matrices cached).
   Beside them, what the original app paid per request: reloading the model.
2. Exact top-k over a synthetic 50,000 x 512 fp16 matrix of contributions (clustered,
   like real head contributions): float32 cached matrix-vector product + argpartition,
   the fp16 matrix converted per query, and a Python heap loop (the original's ranking).
3. FAISS inverted-file search (when faiss-cpu is installed): build time, query time and
   recall@k against exact search, on the synthetic matrix and on the toy run's heads.

    python bench/analyses.py [--n 10000] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _row(name: str, ms: float, target_ms: float | None, note: str = "") -> str:
    verdict = "" if target_ms is None else ("ok" if ms <= target_ms else "OVER")
    target = "" if target_ms is None else f"< {target_ms:g} ms"
    return f"  {name:<52} {ms:>9.2f} ms   {target:<9} {verdict:<4} {note}".rstrip()


def _run(n: int, model, folder: Path):
    from clip_interpret.runstore import index_images, open_run

    if not (folder / "manifest.json").exists() or not json.loads((folder / "manifest.json").read_text()).get("complete"):
        print(f"indexing {n:,} toy-world images into {folder} (once) ...")
        start = time.perf_counter()
        index_images(model, f"toyworld:{n}:1", folder, progress=False)
        print(f"  {time.perf_counter() - start:.0f} s")
    labels = folder / "labels.json"
    if not labels.exists():  # any two heads: the timing does not depend on which
        labels.write_text(json.dumps({"labeller": "bench", "heads": {"L5.H3": {"label": "color"},
                                                                      "L4.H1": {"label": "color"}}}))
    return open_run(folder, model)


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, dim)).astype(np.float32)
    rows = centres[rng.integers(0, 256, n)] + 1.0 * rng.normal(size=(n, dim)).astype(np.float32)
    return (rows / np.sqrt(dim)).astype(np.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="images in the toy run (default 10000)")
    parser.add_argument("--run", default=None, help="run folder (default out/bench/analyses-toy-N)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the app uses)")
    parser.add_argument("--big", type=int, default=50_000, help="rows of the synthetic matrix")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()

    import torch

    from clip_interpret import analyses as A
    from clip_interpret import load_model

    torch.set_num_threads(args.threads)
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s)")
    model = load_model("toy")
    start = time.perf_counter()
    load_model("toy")  # a second load: imports done, what a per-request reload costs
    load_ms = (time.perf_counter() - start) * 1000
    run = _run(args.n, model, Path(args.run or f"out/bench/analyses-toy-{args.n}"))
    store = A.ContributionStore(run)
    image = 123  # a run image; an uploaded file costs the same plus its decoding
    cases = [
        ("property neighbours (color, k=4)", lambda: A.property_neighbours(model, run, image, "color", store=store)),
        ("topic segmentation (all heads)", lambda: A.topic_segmentation(model, image, "a red circle", "all", run=run)),
        ("topic segmentation (one head)", lambda: A.topic_segmentation(model, image, "a red circle", "L5.H3", run=run)),
        ("contrastive segmentation (all heads)",
         lambda: A.contrastive_segmentation(model, image, "a red circle", "a striped background", "all", run=run)),
        ("image neighbours (L5.H3, k=8)", lambda: A.image_neighbours(model, run, image, "L5.H3", store=store)),
        ("image neighbours (all heads summed, k=8)", lambda: A.image_neighbours(model, run, image, "all", store=store)),
        ("text neighbours (L5.H3, k=3)", lambda: A.text_neighbours(model, run, "a red circle", "L5.H3", store=store)),
    ]
    print(f"\n1. The analyses, toy model, run of {len(run):,} images (median of {args.repeats}, after warm-up)")
    for name, fn in cases:
        print(_row(name, _median_ms(fn, args.repeats), 1000))
    cold = A.ContributionStore(run, max_bytes=0)
    print(_row("image neighbours, nothing cached (fp16 shards)", _median_ms(
        lambda: A.image_neighbours(model, run, image, "L5.H3", store=cold), args.repeats), 1000))
    print(_row("rendering a result to PNG (CLI)", _median_ms(
        lambda: A.render(A.text_neighbours(model, run, "a red circle", "L5.H3", store=store)), 3, 1), None))
    print(_row("reloading the model (the original app, per request)", load_ms, None))

    print(f"\n2. Exact top-{args.k} over {args.big:,} x {args.dim} contributions (stored as fp16), per query")
    matrix16 = _clustered(args.big, args.dim)
    matrix = matrix16.astype(np.float32)
    rng = np.random.default_rng(1)
    queries = matrix[rng.choice(args.big, 100, replace=False)] + rng.normal(size=(100, args.dim)).astype(np.float32) * 0.01
    it = iter(range(10**9))
    exact = lambda: A.top_k(A.matvec(matrix, queries[next(it) % 100]), args.k)  # noqa: E731
    print(_row("float32 matrix kept in memory (the app)", _median_ms(exact, 50, 5), 20))
    convert = lambda: A.top_k(A.matvec(matrix16.astype(np.float32), queries[0]), args.k)  # noqa: E731
    print(_row("fp16 matrix converted per query", _median_ms(convert, 10), None))

    def heap_loop():
        heap = []
        query = queries[0]
        for i, row in enumerate(matrix):
            score = float(np.dot(row, query))
            if len(heap) < args.k:
                heapq.heappush(heap, (score, i))
            else:
                heapq.heappushpop(heap, (score, i))
        return sorted(heap, reverse=True)

    heap_ms = _median_ms(heap_loop, 3, 1)
    print(_row("Python heap loop (the original app)", heap_ms, None))
    assert [i for _, i in heap_loop()] == list(A.top_k(A.matvec(matrix, queries[0]), args.k))

    print(f"\n3. Approximate search (FAISS IVF, inner product) against exact, recall@{args.k}")
    try:
        import faiss  # noqa: F401
    except ImportError:
        print("  faiss-cpu is not installed (pip install 'clip-interpret[ann]'): skipped")
        return
    head = store.matrix(["L5.H3"])
    for name, data in ((f"synthetic {args.big:,} x {args.dim}", matrix), (f"toy run L5.H3, {len(run):,} x {run.dim}", head)):
        start = time.perf_counter()
        index = A.ApproximateIndex(data)
        build = time.perf_counter() - start
        qs = data[rng.choice(len(data), 100, replace=False)]  # image-like queries: rows of the data
        if name.startswith("synthetic"):  # and text-like ones: unrelated directions
            qs = np.concatenate([qs[:50], rng.normal(size=(50, data.shape[1])).astype(np.float32)])
        truth = np.stack([A.top_k(A.matvec(data, q), args.k) for q in qs])
        for nprobe in sorted({max(1, index.nlist // d) for d in (16, 8, 4, 2)}):
            index.index.nprobe = nprobe
            found = np.stack([index.search(q, args.k)[0] for q in qs])
            it2 = iter(range(10**9))
            ms = _median_ms(lambda: index.search(qs[next(it2) % 100], args.k), 50, 5)
            print(_row(f"{name}: nlist {index.nlist}, nprobe {nprobe}", ms, None,
                       f"recall@{args.k} {A.recall_at_k(truth, found):.3f}, build {build:.1f} s"))


if __name__ == "__main__":
    main()
