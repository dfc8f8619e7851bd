"""The web app: ``clip-interpret app RUN [RUN ...]`` serves the five analyses over the runs.

``core`` holds the runs, models and handlers (no web); ``ui`` builds the gradio page.
``serve`` loads every run's model once, then serves on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import ClipInterpretError
from ..runstore.store import pid_alive
from .core import Registry

TEMP_PREFIX = "clip-interpret-app-"


def _private_temp_dir() -> str:
    """A fresh folder for this process's uploads and result images, removed when the process exits
    (also on SIGTERM); folders left by app processes that no longer run (kill -9) are removed first."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{TEMP_PREFIX}*"):
        match = re.match(rf"{TEMP_PREFIX}(\d+)-", old.name)
        if match and old.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _stop_on_sigterm()
    return folder


def _stop_on_sigterm() -> None:
    """SIGTERM like Ctrl-C (a KeyboardInterrupt in the main thread): the server stops, atexit runs."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _release_large_blocks() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own, so that a freed decoded upload goes
    back to the system. (By default glibc raises that threshold after the first such free, and the
    memory of a decoded 50 MP image then stays in the arena of the thread that decoded it: several GB
    for a few sessions.) Elsewhere than glibc, nothing to do."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def serve(runs, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 10, model: str | None = None,
          threads: int = 1, concurrency: int = 4, block: bool = True, device: str = "auto",
          precision: str = "fp32", tokenizer=None):
    """Start the app; returns gradio's (app, local url, share url) when ``block`` is False. With ``block``,
    serve until Ctrl-C or SIGTERM, which stop it quietly (the command then exits with status 0).

    ``threads``: torch threads per request (single-image work gains little from more, and
    several requests run at once, up to ``concurrency``). ``device``/``precision``: where and
    how the models compute (each loaded once per process); ``tokenizer``: replaces the models'
    own (a folder of Hugging Face tokenizer files; ``load_model``).
    """
    import torch

    if max_upload_mb <= 0:
        raise ClipInterpretError("--max-upload-mb must be positive")
    # this process's own upload folder, made before gradio is imported (it reads the variable then)
    if "GRADIO_TEMP_DIR" not in os.environ:
        os.environ["GRADIO_TEMP_DIR"] = _private_temp_dir()
    torch.set_num_threads(max(1, threads))
    _release_large_blocks()
    from functools import partial

    from ..device import check_precision, resolve_device
    from ..models import load_model

    loader = partial(load_model, tokenizer=tokenizer, device=resolve_device(device), precision=check_precision(precision))
    registry = Registry(runs, model=model, loader=loader)
    for entry in registry.entries.values():
        if entry.usable:
            print(f"run {entry.key}: {len(entry.run):,} images, model {entry.run.model_spec}"
                  + (f" ({entry.labels_note})" if entry.labels_note else f", {len(entry.labels)} labelled heads"))
        else:
            print(f"run {entry.key} ({entry.path}) is unavailable: {entry.error}", file=sys.stderr)
    if registry.first_usable() is None:
        raise ClipInterpretError("none of the runs can be served: "
                                 + "; ".join(f"{e.key}: {e.error}" for e in registry.entries.values()))
    from starlette.middleware import Middleware

    from .ui import CSS, PathMask, UploadFilter, build

    demo = build(registry)
    demo.queue(default_concurrency_limit=max(1, concurrency))
    if block:
        _stop_on_sigterm()  # also when GRADIO_TEMP_DIR was set (no folder of ours to remove then)
    try:
        runs = {e.key: str(e.path) for e in registry.entries.values()}
        try:
            # quiet: gradio's own lines (its URL, "set share=True", "Keyboard interruption ...") are not printed
            launched = demo.launch(server_name=host, server_port=port, share=False,
                                   max_file_size=int(max_upload_mb * 2**20), prevent_thread_lock=True, quiet=True,
                                   ssr_mode=False, inbrowser=False, css=CSS, footer_links=["gradio", "settings"],
                                   app_kwargs={"middleware": [  # PathMask outermost: no answer names a server path
                                       Middleware(PathMask, runs=runs), Middleware(UploadFilter)]})
        except OSError as err:  # port taken, address not on this machine, ...
            raise ClipInterpretError(f"cannot serve on {host}:{port}: {err}") from None
        if not block:
            return launched
        print(f"serving on {demo.local_url} (stop with Ctrl-C)", flush=True)
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM turned into the same: a normal stop, said nothing about
        if not block:
            raise
    finally:
        if block:
            demo.close(verbose=False)
    return None


__all__ = ["Registry", "serve"]
