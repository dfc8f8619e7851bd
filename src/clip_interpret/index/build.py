"""index_images: decompose an image collection into a run directory, resumably."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..decompose import decompose_pixels, resolve_layers
from ..errors import ClipInterpretError, ImageLoadError
from ..images import load_image
from .sources import ImageSource, open_source
from .store import MANIFEST_VERSION, Run, atomic_save_npy, atomic_write_json, piece_layout

DTYPES = {"fp16": np.float16, "fp32": np.float32}
SHARD_SIZE = 1024


def _manifest(model, source: ImageSource, layers, other_layers, dtype: str, shard_size: int) -> dict:
    cfg = model.vit.cfg
    return {
        "version": MANIFEST_VERSION,
        "model": {"spec": model.spec, "fingerprint": model.fingerprint(), "note": model.note,
                  "random_weights": model.random_weights, "vit": cfg.to_dict()},
        "preprocess": model.preprocess.to_dict(),
        "source": source.describe(),
        "layers": layers,
        "other_layers": other_layers,
        "n_layers": cfg.layers,
        "n_heads": cfg.heads,
        "dim": cfg.output_dim,
        "dtype": dtype,
        "shard_size": shard_size,
        "layout": piece_layout(layers, other_layers, cfg.layers, cfg.heads),
        "complete": False,
    }


_CHECKED = ("version", "layers", "dtype", "shard_size", "preprocess")


def _check_resume(existing: dict, fresh: dict, out: Path) -> None:
    problems = []
    if existing.get("model", {}).get("fingerprint") != fresh["model"]["fingerprint"]:
        problems.append(f"model {existing.get('model', {}).get('spec')!r} (fingerprint "
                        f"{existing.get('model', {}).get('fingerprint')}) vs {fresh['model']['spec']!r} "
                        f"(fingerprint {fresh['model']['fingerprint']})")
    if existing.get("source", {}).get("hash") != fresh["source"]["hash"]:
        problems.append(f"image source {existing.get('source', {}).get('spec')!r} "
                        f"({existing.get('source', {}).get('n')} images) vs {fresh['source']['spec']!r} "
                        f"({fresh['source']['n']} images)")
    for key in _CHECKED:
        if json.loads(json.dumps(existing.get(key))) != json.loads(json.dumps(fresh[key])):
            problems.append(f"{key} {existing.get(key)!r} vs {fresh[key]!r}")
    if problems:
        raise ClipInterpretError(f"{out} already holds a run made with other settings: {'; '.join(problems)}. "
                                 "Choose another --out folder (or delete this one)")


def _flatten(d, layout: dict, dtype) -> np.ndarray:
    """A Decomposition -> [B, P, D] rows in the manifest layout."""
    b, dim = d.embedding.shape
    parts = [d.heads.reshape(b, -1, dim), d.attn_bias, d.other_attn, d.mlps, d.cls_embed[:, None], d.constant[:, None]]
    rows = torch.cat(parts, dim=1).float().cpu().numpy()
    assert rows.shape[1] == max(stop for _, stop in layout.values())
    return rows.astype(dtype)


def _load(source: ImageSource, index: int, preprocess):
    try:
        return preprocess(load_image(source.load(index))), None
    except ImageLoadError as err:
        return None, {"index": index, "source": err.source, "reason": err.reason}


def _prefetched(pool, batches, load):
    """Load batch k+1 in the background while batch k is decomposed (one batch ahead, bounded memory)."""
    future = pool.submit(load, batches[0]) if batches else None
    for k in range(len(batches)):
        current = future.result()
        future = pool.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
        yield current


def index_images(model, source: str | ImageSource, out: str | Path, layers=None, batch_size: int = 64,
                 dtype: str = "fp16", shard_size: int = SHARD_SIZE, progress: bool = True,
                 stop_after_shards: int | None = None) -> Run:
    """Decompose every image of ``source`` into the run directory ``out`` and return the Run.

    Resumes an interrupted run (only unfinished shards are redone); refuses a
    folder that holds a run made with other settings.
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ClipInterpretError(f"unknown dtype {dtype!r}; choose fp16 or fp32")
    if batch_size < 1 or shard_size < 1:
        raise ClipInterpretError("batch size and shard size must be at least 1")
    src = open_source(source) if isinstance(source, str) else source
    chosen = resolve_layers(layers, model.vit.cfg.layers)
    others = [i for i in range(model.vit.cfg.layers) if i not in chosen]
    out = Path(out)
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClipInterpretError(f"cannot create run folder {out}: {err.strerror or err}") from None
    manifest = _manifest(model, src, chosen, others, dtype, shard_size)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        _check_resume(json.loads(manifest_path.read_text()), manifest, out)
    else:
        atomic_write_json(out / "images.json", {"names": src.names, "labels": src.labels})
        atomic_write_json(manifest_path, manifest)
    for stale in (out / "shards").glob(".*.tmp"):  # left by an interrupted write
        stale.unlink()

    layout = manifest["layout"]
    np_dtype = DTYPES[dtype]
    n = len(src)
    n_shards = (n + shard_size - 1) // shard_size
    done = {int(p.name.split(".")[0]) for p in (out / "shards").glob("[0-9]*.json")}
    todo = [s for s in range(n_shards) if s not in done]
    already = sum(min(shard_size, n - s * shard_size) for s in done)
    bar = tqdm(total=n, initial=already, desc="indexing", unit="img", disable=not progress, smoothing=0.1)
    vit = model.vit
    device = vit.proj.device
    written = 0
    with ThreadPoolExecutor(max_workers=1) as pool:  # image decoding overlaps the forward pass
        for shard in todo:
            start, stop = shard * shard_size, min(n, (shard + 1) * shard_size)
            rows, embs, kept, failures = [], [], [], []
            batches = [list(range(b, min(stop, b + batch_size))) for b in range(start, stop, batch_size)]
            for loaded in _prefetched(pool, batches, lambda ids: [(i, *_load(src, i, model.preprocess)) for i in ids]):
                good = [(i, px) for i, px, failure in loaded if px is not None]
                failures += [failure for _, px, failure in loaded if px is None]
                if good:
                    pixels = torch.stack([px for _, px in good]).to(device)
                    d = decompose_pixels(vit, pixels, layers=chosen)
                    rows.append(_flatten(d, layout, np_dtype))
                    embs.append(d.embedding.float().cpu().numpy())
                    kept += [i for i, _ in good]
                bar.update(len(loaded))
            dim = manifest["dim"]
            p_rows = max(stop_ for _, stop_ in layout.values())
            atomic_save_npy(out / "shards" / f"{shard:05d}.pieces.npy",
                            np.concatenate(rows) if rows else np.zeros((0, p_rows, dim), np_dtype))
            atomic_save_npy(out / "shards" / f"{shard:05d}.emb.npy",
                            np.concatenate(embs) if embs else np.zeros((0, dim), np.float32))
            atomic_write_json(out / "shards" / f"{shard:05d}.json",
                              {"shard": shard, "start": start, "stop": stop, "kept": kept, "failures": failures})
            written += 1
            if stop_after_shards is not None and written >= stop_after_shards:
                break
    bar.close()
    finished = {int(p.name.split(".")[0]) for p in (out / "shards").glob("[0-9]*.json")}
    if len(finished) == n_shards:
        final = json.loads(manifest_path.read_text())
        final["complete"] = True
        final["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        run = Run(out)
        final["n_indexed"] = len(run)
        final["n_failed"] = len(run.failures)
        atomic_write_json(manifest_path, final)
    return Run(out)
