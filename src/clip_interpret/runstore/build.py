"""index_images: decompose an image collection into a run directory, resumably.

Images flow through the input pipeline (``clip_interpret.pipeline``: worker
processes, device decoding, pinned non-blocking copies), the model decomposes
each batch on its device in the chosen compute precision, the rows come back in
the storage dtype, and a background writer thread writes each finished shard
atomically while the next ones are computed.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..conventions import DEFAULT_CONVENTION
from ..decompose import check_convention, decompose_pixels, resolve_layers
from ..device import is_out_of_memory, out_of_memory_error, resolve_precision
from ..engine import Engine, resolve_engine
from ..errors import ClipInterpretError
from ..pipeline import DEFAULT_TIMEOUT_S, pixel_batches, resolve_decoder, resolve_workers
from .sources import ImageSource, open_source
from .store import (MANIFEST_VERSION, Run, RunLock, read_shard_info, atomic_save_npy, atomic_write_json,
                    check_recorded_shard, check_shard_array, empty_run_error, piece_layout, read_manifest)

STORAGE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SHARD_SIZE = 1024


def _manifest(model, source: ImageSource, layers, other_layers, storage: str, shard_size: int,
              precision: str, convention: str) -> dict:
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
        "dtype": storage,
        "precision": precision,
        "convention": convention,
        "shard_size": shard_size,
        "layout": piece_layout(layers, other_layers, cfg.layers, cfg.heads, pooled=cfg.pool == "map"),
        "complete": False,
    }


_CHECKED = {"version": None, "layers": None, "dtype": None, "shard_size": None, "preprocess": None,
            "precision": "fp32", "convention": DEFAULT_CONVENTION}  # key -> its value in runs written before the
#                                                                          key existed


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
    for key, old_default in _CHECKED.items():
        theirs = existing.get(key, old_default)
        if json.loads(json.dumps(theirs)) != json.loads(json.dumps(fresh[key])):
            name = {"dtype": "storage dtype", "precision": "compute precision"}.get(key, key)
            problems.append(f"{name} {theirs!r} vs {fresh[key]!r}")
    if problems:
        raise ClipInterpretError(f"{out} already holds a run made with other settings: {'; '.join(problems)}. "
                                 "Choose another --out folder (or delete this one), or resume with the run's settings")


def _rows(d, layout: dict, storage: torch.dtype) -> torch.Tensor:
    """A Decomposition -> [B, P, D] rows in the manifest layout, in the storage dtype, on its device."""
    b, dim = d.embedding.shape
    parts = [d.heads.reshape(b, -1, dim), d.attn_bias, d.other_attn, d.mlps, d.cls_embed[:, None], d.pool_mlp,
             d.constant[:, None]]
    rows = torch.cat(parts, dim=1)
    assert rows.shape[1] == max(stop for _, stop in layout.values())
    return rows.to(storage)


@dataclass
class _Rows:
    """One batch's pixels -> (rows [n, P, D] in the storage dtype, unit embeddings [n, D]), on the
    pixels' device; picklable, so that on a CPU the reading workers can run it (data parallel)."""

    vit: torch.nn.Module
    layers: list[int]
    precision: str
    layout: dict
    storage: str
    convention: str = DEFAULT_CONVENTION

    def __call__(self, pixels: torch.Tensor):  # precision and convention were checked once, by index_images
        d = decompose_pixels(self.vit, pixels, layers=self.layers, precision=self.precision,
                             convention=self.convention, checked=True)
        return _rows(d, self.layout, STORAGE_DTYPES[self.storage]), d.embedding


class ShardWriter:
    """Writes finished shards in a background thread (atomically, the record last), so the
    device keeps computing; a write error stops the run at the next submit or at close."""

    def __init__(self, folder: Path, pending: int = 2):
        self.folder = folder
        self.queue: queue.Queue = queue.Queue(maxsize=pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="clip-interpret-shard-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is None:
                try:
                    self._write(*job)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self.error = err

    def _write(self, record: dict, pieces: np.ndarray, embs: np.ndarray) -> None:
        stem = self.folder / f"{record['shard']:05d}"
        atomic_save_npy(stem.with_name(stem.name + ".pieces.npy"), pieces)
        atomic_save_npy(stem.with_name(stem.name + ".emb.npy"), embs)
        atomic_write_json(stem.with_name(stem.name + ".json"), record)  # last: the shard is done

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, record: dict, pieces: np.ndarray, embs: np.ndarray) -> None:
        self._raise()
        self.queue.put((record, pieces, embs))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()


class _Shard:
    """Rows of one shard as its batches finish."""

    def __init__(self, shard: int, start: int, stop: int, n_batches: int):
        self.record = {"shard": shard, "start": start, "stop": stop, "kept": [], "failures": []}
        self.left = n_batches
        self.pieces, self.embs = [], []


@dataclass
class ShardJob:
    """What every shard of a run needs besides the model (picklable: a Ray worker gets it once)."""

    source: ImageSource
    out: Path  # the run folder
    shard_size: int
    batch_size: int
    layers: list[int]
    layout: dict
    dim: int
    storage: str
    precision: str
    decode: str = "auto"
    draft: bool = False
    timeout: float = DEFAULT_TIMEOUT_S
    convention: str = DEFAULT_CONVENTION

    @property
    def n_shards(self) -> int:
        return (len(self.source) + self.shard_size - 1) // self.shard_size

    def bounds(self, shard: int) -> tuple[int, int]:
        """The source items [start, stop) of shard number ``shard``."""
        return shard * self.shard_size, min(len(self.source), (shard + 1) * self.shard_size)

    def finished(self) -> set[int]:
        """Numbers of the shards whose record is written (whoever wrote them)."""
        return {int(p.name.split(".")[0]) for p in (self.out / "shards").glob("[0-9]*.json")}

    def intact(self, manifest: dict) -> set[int]:
        """The finished shards whose files check out (``verify_shard``); the record of a damaged one
        is deleted, so that it counts as unfinished and is written again."""
        good = set()
        for shard in sorted(self.finished()):
            if shard < self.n_shards and verify_shard(self.out, manifest, shard, len(self.source)):
                good.add(shard)
            else:
                (self.out / "shards" / f"{shard:05d}.json").unlink(missing_ok=True)
        return good


def verify_shard(out: Path, manifest: dict, shard: int, n_items: int) -> bool:
    """Whether a written shard is whole: a valid record for its item range, and both arrays with the
    header and byte size its rows call for (what ``Run`` checks when it opens a run; no hashing)."""
    try:
        info = read_shard_info(out / "shards" / f"{shard:05d}.json", n_items, manifest.get("shard_size"), manifest)
        for kind in ("pieces", "emb"):
            check_shard_array(out, manifest, info, kind)
        check_recorded_shard(out, manifest, info)
    except (ClipInterpretError, OSError):
        return False
    return True


def write_shards(job: ShardJob, vit, preprocess, shards, workers: int | None = None, on_batch=None,
                 stop_after: int | None = None) -> int:
    """Index the shards numbered ``shards`` of ``job`` into its run folder with ``vit`` (on its
    device) and return how many were written. Each shard is written atomically, its record last.
    The local engine calls this for every unfinished shard; a Ray worker for the shards it is
    given: the same bytes whoever writes them. ``workers``: reading processes;
    ``on_batch(n)``: called with the number of images of each finished batch."""
    device = vit.device
    decoder = resolve_decoder(job.decode, device, preprocess)
    n = len(job.source)
    workers = resolve_workers(workers, n)
    if decoder == "device" and device.type == "cpu" and workers:
        decoder = "torch"  # on a CPU the workers decode and compute (see pixel_batches)
    batches, owner, accumulators = [], [], {}
    for shard in shards:
        start, stop = job.bounds(shard)
        ranges = [list(range(b, min(stop, b + job.batch_size))) for b in range(start, stop, job.batch_size)]
        accumulators[shard] = _Shard(shard, start, stop, len(ranges))
        batches += ranges
        owner += [shard] * len(ranges)

    writer = ShardWriter(job.out / "shards")
    written = 0
    pending = None  # the previous batch, its rows still on their way to the host
    p_rows = max(stop for _, stop in job.layout.values())
    np_dtype = np.float16 if job.storage == "fp16" else np.float32

    def finish(item) -> int:
        """Hand a computed batch's rows to its shard; write the shard when it is complete."""
        shard, batch, pieces, embs, event = item
        if event is not None:
            event.synchronize()
        acc = accumulators[shard]
        if pieces is not None:
            acc.pieces.append(pieces.numpy())
            acc.embs.append(embs.numpy())
            acc.record["kept"] += batch.indices
        acc.record["failures"] += batch.failures
        acc.left -= 1
        if on_batch is not None:
            on_batch(len(batch.indices) + len(batch.failures))
        if acc.left:
            return 0
        acc.record["decoder"] = decoder
        writer.submit(acc.record,
                      np.concatenate(acc.pieces) if acc.pieces else np.zeros((0, p_rows, job.dim), np_dtype),
                      np.concatenate(acc.embs) if acc.embs else np.zeros((0, job.dim), np.float32))
        del accumulators[shard]
        return 1

    compute = _Rows(vit, job.layers, job.precision, job.layout, job.storage, job.convention)
    stream = pixel_batches(job.source, preprocess, batches, device, workers=workers, decode=decoder, draft=job.draft,
                           timeout=job.timeout, compute=compute)
    try:
        for batch in stream:
            item = (owner[batch.number], batch, None, None, None)
            if batch.indices:
                try:
                    pieces, embs = batch.result(compute)
                except RuntimeError as err:
                    if not is_out_of_memory(err):
                        raise
                    raise out_of_memory_error(device, job.batch_size, "while indexing ") from None
                event = None
                if pieces.device.type == "cuda":  # into pinned host memory, while the device goes on
                    pieces, embs = pieces.to("cpu", non_blocking=True), embs.to("cpu", non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                item = (owner[batch.number], batch, pieces, embs, event)
            if pending is not None:
                written += finish(pending)
            pending = item
            if stop_after is not None and written >= stop_after:
                pending = None
                break
        if pending is not None:
            written += finish(pending)
    finally:
        stream.close()
        writer.close()
    return written


def index_images(model, source: str | ImageSource, out: str | Path, layers=None, batch_size: int = 64,
                 storage: str = "fp16", shard_size: int = SHARD_SIZE, progress: bool = True,
                 stop_after_shards: int | None = None, workers: int | None = None, decode: str = "auto",
                 draft: bool = False, precision: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 dtype: str | None = None, engine: str | Engine = "local", ray_address: str | None = None,
                 gpus_per_worker: float = 0, cpus_per_worker: float = 1, convention: str = DEFAULT_CONVENTION) -> Run:
    """Decompose every image of ``source`` into the run directory ``out`` and return the Run.

    Resumes an interrupted run (only unfinished shards are redone, whichever engine wrote
    the others); refuses a folder that holds a run made with other settings, or that another
    indexing process is writing. ``storage``: dtype of the stored pieces (fp16 or fp32);
    ``precision``: compute precision (default: the model's); ``decode``/``draft``/``timeout``:
    see ``clip_interpret.pipeline``; ``convention``: ``centred`` or ``published`` (see
    ``clip_interpret.decompose``), recorded in the manifest.

    ``engine="local"``: this process, with ``workers`` image-reading processes (default: the
    cores available). ``engine="ray"``: ``workers`` Ray workers (default: as many as the
    cluster fits), each holding the model once on ``gpus_per_worker`` GPUs with
    ``cpus_per_worker`` reading processes, on the cluster at ``ray_address`` (default: a
    local Ray started for the call); ``out`` must be a folder every node sees (see docs/scale.md).
    """
    from tqdm import tqdm

    storage = dtype or storage  # ``dtype`` is the old name of ``storage``
    if storage not in STORAGE_DTYPES:
        raise ClipInterpretError(f"unknown storage dtype {storage!r}; choose fp16 or fp32")
    if batch_size < 1 or shard_size < 1:
        raise ClipInterpretError("batch size and shard size must be at least 1")
    engine = resolve_engine(engine, ray_address, workers, gpus_per_worker, cpus_per_worker)
    precision = resolve_precision(model, precision)
    check_convention(convention)
    src = open_source(source) if isinstance(source, str) else source
    chosen = resolve_layers(layers, model.vit.cfg.layers)
    others = [i for i in range(model.vit.cfg.layers) if i not in chosen]
    out = Path(out)
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClipInterpretError(f"cannot create run folder {out}: {err.strerror or err}") from None
    manifest = _manifest(model, src, chosen, others, storage, shard_size, precision, convention)
    manifest_path = out / "manifest.json"
    job = ShardJob(src, out.absolute(), shard_size, batch_size, chosen, manifest["layout"], manifest["dim"], storage,
                   precision, decode, draft, timeout, convention)
    with RunLock(out) as lock:
        if manifest_path.exists():
            existing = read_manifest(out)
            _check_resume(existing, manifest, out)
        else:
            atomic_write_json(out / "images.json", {"names": src.names, "labels": src.labels})
            atomic_write_json(manifest_path, manifest)
            existing = manifest
        done = job.intact(existing)  # a missing or damaged shard is redone, whatever the manifest says
        todo = [s for s in range(job.n_shards) if s not in done]
        if todo and existing.get("complete"):  # repairing a run: it is not complete until its shards are
            existing = {k: v for k, v in existing.items() if k not in ("completed_at", "n_indexed", "n_failed",
                                                                       "shard_files")}
            existing["complete"] = False
            atomic_write_json(manifest_path, existing)
        already = sum(min(shard_size, len(src) - s * shard_size) for s in done)
        bar = tqdm(total=len(src), initial=already, desc="indexing", unit="img", disable=not progress, smoothing=0.1)
        try:
            if engine.kind == "ray":
                from .distributed import index_on_ray

                index_on_ray(job, model, todo, engine, lock.token, write_shards, on_shard=bar.update,
                             stop_after=stop_after_shards)
            else:
                write_shards(job, model.vit, model.preprocess, todo, workers, bar.update, stop_after_shards)
        finally:
            bar.close()
        for stale in (out / "shards").glob(".*.tmp"):  # left by an interrupted write (no writer is left now)
            stale.unlink()
        if len(job.finished()) == job.n_shards:
            run = Run(out)
            if not len(run):  # not a run any command can use: not marked complete
                raise empty_run_error(run)
            final = read_manifest(out)
            final["complete"] = True
            final["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            final["n_indexed"] = len(run)
            final["n_failed"] = len(run.failures)
            final["shard_files"] = {f"{s.shard:05d}": {"rows": len(s.kept), **{
                f"{kind}_bytes": (out / "shards" / f"{s.shard:05d}.{kind}.npy").stat().st_size
                for kind in ("pieces", "emb")}} for s in run.shards}
            atomic_write_json(manifest_path, final)
    return Run(out)
