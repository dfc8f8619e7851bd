"""The input pipeline: image items -> normalised pixel batches on the compute device.

    source.load(i) ──► worker processes: read + decode + resize + crop (uint8)
                   ──► main process: pinned, copied without blocking, [JPEGs decoded
                       on the device], normalised on the device ──► the model

* **Workers** (``workers=N``) are processes of our own pool, each reading whole
  batches; several batches per worker are in flight, and batches are handed on
  in order, so a run is the same image for image whatever the number of workers
  (``workers=0`` reads in this process). Failures keep their item indices. They are
  forked while CUDA is not initialised here, else started by a fork server, so that
  they never inherit CUDA state (``reader_start_method``).
* A worker that **dies** (killed, or crashed by a hostile file) is replaced and
  its batches are read again; an item that was being read when workers died
  twice is left out as a failure naming the file. An item that takes longer than
  ``timeout`` seconds is left out the same way (its worker is killed). The run
  never hangs on a file.
* **Decoding**: ``decode="pil"`` decodes in the workers with Pillow, exactly as
  open_clip's transform (draft mode for JPEGs at least twice the input size when
  ``draft``); ``"torch"`` decodes JPEGs in the workers with torchvision
  (libjpeg-turbo) and resizes them with torch, about 3x faster per core;
  ``"device"`` sends JPEG bytes to the compute device and decodes them there in
  batches (nvJPEG on a GPU), resizing on the device too. Other formats, and any
  JPEG that torchvision refuses or warns about, take the Pillow path. ``"auto"``:
  ``device`` on a GPU, ``torch`` on the CPU. The paths agree within a few grey
  levels (resampling differs slightly; docs/pipeline.md). EXIF orientation: Pillow
  applies it; for torchvision's decoders (whose CUDA decoder has none) it is read
  from the JPEG header on the host and applied to the decoded tensor where it lies.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .device import cores
from .errors import ClipInterpretError, ImageLoadError
from .images import MAX_PIXELS, apply_orientation, describe, jpeg_orientation, load_image

DECODERS = ("auto", "pil", "torch", "device")
DEFAULT_TIMEOUT_S = 120.0
PREFETCH = 2  # batches in flight per worker
MAX_RESTARTS = 20  # worker replacements per call before giving up
STARTED = -0.5  # a worker's batch number in the pool's status until its first batch


class ListSource:
    """A plain list of images (paths, bytes, PIL images, arrays) as an item source."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int):
        return self.items[i]

    def name(self, i: int) -> str:
        return describe(self.items[i])


def resolve_workers(workers: int | None, n_items: int | None = None) -> int:
    """``None`` -> the cores available (0 for a handful of items); more than the cores is
    clamped with a warning."""
    available = cores()
    if workers is None:
        return 0 if n_items is not None and n_items < 64 else available
    workers = int(workers)
    if workers < 0:
        raise ClipInterpretError(f"--workers must be 0 or more, got {workers}")
    if workers > available:
        warnings.warn(f"--workers {workers} is more than the {available} CPU cores available; using {available}",
                      stacklevel=2)
        return available
    return workers


def resolve_decoder(decode: str, device: torch.device, preprocess) -> str:
    if decode not in DECODERS:
        raise ClipInterpretError(f"unknown decoder {decode!r}; choose one of {', '.join(DECODERS)}")
    if decode == "auto":
        decode = "device" if device.type == "cuda" else "torch"
    if decode != "pil" and preprocess.interpolation not in ("bicubic", "bilinear", "nearest"):
        return "pil"  # torchvision resizes tensors with these only
    return decode


def _decode_jpeg(data, device="cpu"):
    """torchvision's JPEG decoder (libjpeg-turbo on the CPU, nvJPEG on a GPU): RGB, as stored. Its CUDA
    decoder has no EXIF orientation, so no path asks it for one: the callers read the orientation
    from the header (``jpeg_orientation``) and turn the decoded tensor (``apply_orientation``), on
    the CPU and on the GPU alike. A warning (corrupt or truncated data) counts as a failure: the
    caller falls back to Pillow."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at torchcodec
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


# ------------------------------------------------------------------ reading
def _jpeg_bytes(raw) -> bytes | None:
    """The bytes of a JPEG that the device decoder can take (RGB or grey, within the pixel limit), else None."""
    from PIL import Image

    try:
        if isinstance(raw, (str, os.PathLike)):
            with open(raw, "rb") as handle:
                data = handle.read()
        elif isinstance(raw, (bytes, bytearray)):
            data = bytes(raw)
        else:
            return None
        if not data.startswith(b"\xff\xd8\xff"):
            return None
        with Image.open(io.BytesIO(data)) as image:  # the header only: format, mode, size
            w, h = image.size
            if image.format != "JPEG" or image.mode not in ("RGB", "L") or not 0 < w * h <= MAX_PIXELS:
                return None
        return data
    except Exception:  # noqa: BLE001 - anything odd takes the Pillow path, which names the problem
        return None


def read_batch(source, preprocess, indices: Sequence[int], bad: dict[int, str], decoder: str,
               draft: bool, mark: Callable[[int], None] | None = None) -> dict:
    """Read the items ``indices`` of ``source``: uint8 crops, raw JPEG bytes (for the ``device``
    decoder) with their EXIF orientations, and failures (index, source, reason); items in ``bad``
    are failures unread. ``decoder``: ``pil``, ``torch`` (JPEGs decoded here by torchvision) or ``device``."""
    crops, crop_idx, jpegs, jpeg_idx, orientations, failures = [], [], [], [], [], []
    for i in indices:
        if i in bad:
            failures.append({"index": i, "source": source.name(i), "reason": bad[i]})
            continue
        if mark is not None:
            mark(i)
        try:
            raw = source.load(i)
            data = _jpeg_bytes(raw) if decoder != "pil" else None
            if data is not None and decoder == "device":
                jpegs.append(np.frombuffer(data, np.uint8))
                jpeg_idx.append(i)
                orientations.append(jpeg_orientation(data))  # the header, read here on the host
                continue
            crop = None
            if data is not None:
                try:
                    image = _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    crop = preprocess.crop_tensor(apply_orientation(image, jpeg_orientation(data)))
                except Exception:  # noqa: BLE001 - Pillow decides below, and names the problem
                    crop = None
            if crop is None:
                crop = preprocess.crop_uint8(load_image(raw, draft=preprocess.draft_size if draft else None))
            crops.append(crop)
            crop_idx.append(i)
        except ImageLoadError as err:
            failures.append({"index": i, "source": source.name(i), "reason": err.reason})
    h, w = preprocess.image_size
    return {
        "crops": torch.stack(crops) if crops else torch.zeros((0, 3, h, w), dtype=torch.uint8),
        "crop_idx": crop_idx,
        "jpeg": torch.from_numpy(np.concatenate(jpegs)) if jpegs else torch.zeros(0, dtype=torch.uint8),
        "jpeg_len": [len(j) for j in jpegs],
        "jpeg_idx": jpeg_idx,
        "jpeg_orientation": orientations,
        "failures": failures,
    }


# --------------------------------------------------------------------- pool
def reader_start_method(cuda_initialised: bool | None = None) -> str:
    """How the pool starts its worker processes (``cuda_initialised``: by default, whether CUDA is
    initialised in this process, ``torch.cuda.is_initialized()``).

    ``fork`` while CUDA is not initialised: quickest, nothing to import or pickle. Once it is (a
    model on a GPU), a forked child would inherit the CUDA context and the CUDA runtime's threads'
    locks, which a child must never use: then ``forkserver`` (the workers are forked from a clean
    server process that has imported torch and this module once, so each starts in milliseconds),
    or ``spawn`` where there is no forkserver.
    """
    import torch.multiprocessing as mp

    methods = mp.get_all_start_methods()
    if cuda_initialised is None:
        cuda_initialised = torch.cuda.is_initialized()
    if not cuda_initialised and "fork" in methods:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _parent_alive(parent: int) -> bool:
    """Whether the process that made the pool still runs (a forkserver's workers are its children,
    not the pool's: ask the multiprocessing parent, whatever the start method)."""
    import multiprocessing

    process = multiprocessing.parent_process()
    return process.is_alive() if process is not None else os.getppid() == parent


def _worker_main(slot: int, tasks, results, status, reader, parent: int) -> None:
    """One pool worker: read the batches it is given, report which item it is on."""
    status[3 * slot] = STARTED  # it got this far: its arguments reached it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)

    def mark(item: int) -> None:
        status[3 * slot + 2] = time.monotonic()
        status[3 * slot + 1] = item

    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if not _parent_alive(parent):
                return  # the main process is gone
            continue
        if task is None:
            return
        k, indices, bad = task
        status[3 * slot] = k
        payload = reader(indices, bad, mark)
        status[3 * slot + 1] = -1
        results.put((k, payload))


@dataclass
class _Worker:
    process: Any
    tasks: Any
    results: Any  # its own queue: a worker killed while answering cannot garble the others' answers
    outstanding: deque
    method: str = "fork"  # how it was started


class DecodePool:
    """Worker processes reading batches of items; results come back in batch order.

    ``reader(indices, bad, mark)`` runs in the workers (it must not touch a GPU). The workers are
    started by ``start_method`` (default: ``reader_start_method()``); with ``forkserver`` or
    ``spawn`` the reader is pickled to them, and a reader that cannot be (or that a new process
    cannot unpickle: a class defined in a notebook) makes the pool fork its workers instead, with
    a warning, as it did before (safe as long as the readers never touch the GPU).
    """

    def __init__(self, reader: Callable, workers: int, timeout: float = DEFAULT_TIMEOUT_S,
                 describe_item: Callable[[int], str] = str, start_method: str | None = None):
        import torch.multiprocessing as mp

        self.reader = reader
        self.n = workers
        self.timeout = timeout
        self.describe_item = describe_item
        self.method = start_method or reader_start_method()
        self.ctx = mp.get_context(self.method)
        if self.method == "forkserver":
            # the server imports these once (no CUDA: importing torch does not initialise it)
            self.ctx.set_forkserver_preload(["__main__", __name__])
        self.status = self.ctx.Array("d", [-1.0] * (3 * workers), lock=False)  # per slot: batch, item, start
        self.workers: list[_Worker | None] = [None] * workers
        self.bad: dict[int, str] = {}
        self.blamed: Counter = Counter()
        self.restarts = 0
        self._checked = time.monotonic()
        for slot in range(workers):
            self._start(slot)

    def _start(self, slot: int) -> None:
        tasks, results = self.ctx.Queue(), self.ctx.Queue()
        for j in range(3):
            self.status[3 * slot + j] = -1.0
        process = self.ctx.Process(target=_worker_main, daemon=True, name=f"clip-interpret-reader-{slot}",
                                   args=(slot, tasks, results, self.status, self.reader, os.getpid()))
        try:
            process.start()
        except Exception as err:  # noqa: BLE001 - the reader does not pickle (spawn, forkserver)
            if not self._fall_back_to_fork(f"{type(err).__name__}: {err}"):
                raise
            return self._start(slot)
        self.workers[slot] = _Worker(process, tasks, results, deque(), self.method)

    def _fall_back_to_fork(self, why: str) -> bool:
        """Fork the workers from now on, if they were not forked and can be; whether it switched."""
        import torch.multiprocessing as mp

        if self.method == "fork" or "fork" not in mp.get_all_start_methods():
            return False
        warnings.warn(f"image reading workers cannot be started with {self.method!r} (the image source, or the "
                      f"computation run in the workers, does not pickle, or a new process cannot unpickle it: {why}); "
                      "forking them instead", RuntimeWarning, stacklevel=2)
        self.method = "fork"
        self.ctx = mp.get_context("fork")
        return True

    def close(self) -> None:
        for worker in self.workers:
            if worker is not None and worker.process.is_alive():
                worker.tasks.put(None)
        deadline = time.monotonic() + 2.0
        for worker in self.workers:
            if worker is None:
                continue
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self.workers = []

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- health
    def _replace(self, slot: int, why: str) -> None:
        """Replace a dead or stuck worker; its batches go to the new one (without the blamed item)."""
        worker = self.workers[slot]
        item = int(self.status[3 * slot + 1])
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        if why == "died" and self.status[3 * slot] == -1.0 and worker.method != "fork":
            # it died before its first line ran: its arguments did not unpickle in a new process
            self._fall_back_to_fork(f"a worker exited with code {worker.process.exitcode} before it started")
        if why == "died" and self.status[3 * slot] == -1.0 and worker.method != self.method:
            pending = list(worker.outstanding)  # nothing was read: no item to blame, no restart to count
            self._start(slot)
            for task in pending:
                self._send(slot, task)
            return
        self.restarts += 1
        if item >= 0:
            if why == "stuck":
                self.bad[item] = f"reading took longer than {self.timeout:g} s (a hostile or huge file?); skipped"
            else:
                self.blamed[item] += 1
                if self.blamed[item] >= 2:
                    self.bad[item] = "the reading process died twice on this file (crashed or killed); skipped"
        if self.restarts > MAX_RESTARTS:
            suspects = ", ".join(self.describe_item(i) for i in list(self.blamed)[:5]) or "none in particular"
            raise ClipInterpretError(f"image reading workers died {self.restarts} times (killed, or crashed by "
                                     f"files: {suspects}); stopping. Run again to resume, or use --workers 0 to see "
                                     "the error in this process")
        pending = list(worker.outstanding)
        self._start(slot)
        for task in pending:
            self._send(slot, task)

    def _check(self) -> None:
        now = self._checked = time.monotonic()
        for slot, worker in enumerate(self.workers):
            if not worker.process.is_alive():
                self._replace(slot, "died")
            elif self.status[3 * slot + 1] >= 0 and now - self.status[3 * slot + 2] > self.timeout:
                self._replace(slot, "stuck")

    def _send(self, slot: int, task) -> None:
        k, indices = task
        worker = self.workers[slot]
        worker.outstanding.append(task)
        worker.tasks.put((k, indices, {i: self.bad[i] for i in indices if i in self.bad}))

    def _receive(self, timeout: float) -> list[tuple[int, dict]]:
        """Answers that arrived within ``timeout`` seconds, as (batch, payload)."""
        from multiprocessing.connection import wait

        readers = {worker.results._reader: slot for slot, worker in enumerate(self.workers)}
        answers = []
        for ready in wait(list(readers), timeout=timeout):
            slot = readers[ready]
            worker = self.workers[slot]
            try:
                k, payload = worker.results.get(timeout=timeout)
            except queue.Empty:
                continue
            except Exception:  # noqa: BLE001 - an answer its dying worker could not finish sending
                self._replace(slot, "died")
                continue
            match = [task for task in worker.outstanding if task[0] == k]
            if match:  # else a late answer to a batch that was sent again
                worker.outstanding.remove(match[0])
                answers.append((k, payload))
        return answers

    # -------------------------------------------------------------- batches
    def map(self, batches: Sequence[Sequence[int]]) -> Iterator[tuple[int, dict]]:
        """(k, payload) for each batch of item indices, in order."""
        todo = deque(enumerate(batches))
        arrived: dict[int, dict] = {}
        window = self.n * PREFETCH  # batches read ahead of the one handed on (bounds memory)
        for k in range(len(batches)):
            while k not in arrived:
                for slot, worker in enumerate(self.workers):
                    while todo and todo[0][0] < k + window and len(worker.outstanding) < PREFETCH:
                        self._send(slot, todo.popleft())
                for done, payload in self._receive(timeout=0.5):
                    arrived[done] = payload
                if k not in arrived and time.monotonic() - self._checked > 0.5:
                    self._check()
            yield k, arrived.pop(k)


# ------------------------------------------------------------------- device
def decode_on_device(payload: dict, preprocess, device: torch.device) -> tuple[dict[int, torch.Tensor], list[int]]:
    """JPEG bytes of a batch -> uint8 crops on ``device`` by index, each turned upright for its EXIF
    orientation on the device; indices the device could not decode."""
    if not payload["jpeg_idx"]:
        return {}, []
    data = torch.split(payload["jpeg"], payload["jpeg_len"])
    try:
        images = _decode_jpeg(list(data), device)
    except Exception:  # noqa: BLE001 - one bad file fails the batch call: decode them one by one
        images = []
        for one in data:
            try:
                images.append(_decode_jpeg(one, device))
            except Exception:  # noqa: BLE001
                images.append(None)
    crops, failed = {}, []
    for i, image, orientation in zip(payload["jpeg_idx"], images, payload["jpeg_orientation"]):
        if image is None:
            failed.append(i)
        else:
            crops[i] = preprocess.crop_tensor(apply_orientation(image, orientation))
    return crops, failed


@dataclass
class _Reader:
    """``read_batch`` with its settings bound (a picklable callable for the pool's workers); with
    ``compute``, the worker also runs it on the normalised pixels and sends back its result."""

    source: Any
    preprocess: Any
    decoder: str
    draft: bool
    compute: Callable | None = None

    def __call__(self, indices, bad, mark=None) -> dict:
        try:
            payload = read_batch(self.source, self.preprocess, indices, bad, self.decoder, self.draft, mark)
            if self.compute is not None:
                if mark is not None:
                    mark(-1)  # computing, not reading: no item to blame for the time it takes
                crops = payload.pop("crops")
                payload["computed"] = self.compute(self.preprocess.normalise(crops)) if payload["crop_idx"] else None
            return payload
        except Exception as err:  # noqa: BLE001 - not the files' fault: the main process re-raises it
            import traceback

            return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


@dataclass
class PixelBatch:
    """One batch ready for the model: ``pixels`` [n, 3, H, W] normalised float32 on the device,
    or, when the workers computed it, ``computed`` (what ``compute`` returned) and no pixels."""

    number: int
    indices: list[int]  # the source items of the rows
    pixels: torch.Tensor | None
    failures: list[dict]  # {"index", "source", "reason"}
    computed: Any = None

    def result(self, compute: Callable):
        """``compute(pixels)``, unless the worker that read the batch already ran it."""
        return self.computed if self.pixels is None else compute(self.pixels)


def pixel_batches(source, preprocess, batches: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                  workers: int | None = 0, decode: str = "auto", draft: bool = False,
                  timeout: float = DEFAULT_TIMEOUT_S, compute: Callable | None = None) -> Iterator[PixelBatch]:
    """Read, decode and preprocess the items of ``source`` batch by batch (see the module doc).

    ``compute``: a picklable callable on a batch's normalised pixels. When the device is
    the CPU and there are workers, each worker runs it on the batches it read (one thread
    each: data parallel, no oversubscribed cores) and the batch carries the result; else
    the caller runs it in this process (``batch.result(compute)``).
    """
    device = torch.device(device)
    n_items = sum(len(b) for b in batches)
    workers = resolve_workers(workers, n_items)
    decoder = resolve_decoder(decode, device, preprocess)
    in_workers = compute is not None and workers > 0 and device.type == "cpu"
    if in_workers and decoder == "device":
        decoder = "torch"  # the worker decodes, on the CPU
    pin = device.type == "cuda"

    reader = _Reader(source, preprocess, decoder, draft, compute if in_workers else None)
    if workers == 0:
        payloads = ((k, reader(list(b), {})) for k, b in enumerate(batches))
        pool = None
    else:
        pool = DecodePool(reader, workers, timeout, describe_item=source.name)
        payloads = pool.map([list(b) for b in batches])
    try:
        for k, payload in payloads:
            if "error" in payload:
                raise RuntimeError(f"reading batch {k} failed: {payload['error']}\n{payload['traceback']}")
            if "computed" in payload:
                yield PixelBatch(k, list(payload["crop_idx"]), None, list(payload["failures"]), payload["computed"])
            else:
                yield _to_device(k, payload, source, preprocess, device, pin, draft)
    finally:
        if pool is not None:
            pool.close()


def _to_device(k: int, payload: dict, source, preprocess, device, pin: bool, draft: bool) -> PixelBatch:
    crops = payload["crops"]
    if pin and crops.numel():
        crops = crops.pin_memory()
    crops = crops.to(device, non_blocking=True)
    if not payload["jpeg_idx"]:  # the common CPU case: the rows are already in order
        return PixelBatch(k, list(payload["crop_idx"]), preprocess.normalise(crops), list(payload["failures"]))
    on_device = dict(zip(payload["crop_idx"], crops))
    decoded, fallback = decode_on_device(payload, preprocess, device)
    on_device.update(decoded)
    failures = list(payload["failures"])
    for i in fallback:  # what the device decoder refused: Pillow decides (and names the problem)
        try:
            image = load_image(source.load(i), draft=preprocess.draft_size if draft else None)
            on_device[i] = preprocess.crop_uint8(image).to(device)
        except ImageLoadError as err:
            failures.append({"index": i, "source": source.name(i), "reason": err.reason})
    kept = sorted(on_device)
    failures.sort(key=lambda f: f["index"])
    if kept:
        pixels = preprocess.normalise(torch.stack([on_device[i] for i in kept]))
    else:
        h, w = preprocess.image_size
        pixels = torch.zeros((0, 3, h, w), device=device)
    return PixelBatch(k, kept, pixels, failures)
