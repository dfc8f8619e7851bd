"""The web app: ``clip-interpret app RUN [RUN ...]`` serves the five analyses over the runs.

``core`` holds the runs, models and handlers (no web); ``ui`` builds the gradio page.
``serve`` loads every run's model once, then serves on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os
import sys
import tempfile

from ..errors import ClipInterpretError
from .core import Registry


def serve(runs, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 10, model: str | None = None,
          threads: int = 1, concurrency: int = 4, block: bool = True, device: str = "auto",
          precision: str = "fp32"):
    """Start the app; returns gradio's (app, local url, share url) when ``block`` is False.

    ``threads``: torch threads per request (single-image work gains little from more, and
    several requests run at once, up to ``concurrency``). ``device``/``precision``: where and
    how the models compute (each loaded once per process).
    """
    import torch

    if max_upload_mb <= 0:
        raise ClipInterpretError("--max-upload-mb must be positive")
    # this process's own upload folder, made before gradio is imported (it reads the variable then)
    os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="clip-interpret-app-"))
    torch.set_num_threads(max(1, threads))
    from functools import partial

    from ..device import check_precision, resolve_device
    from ..models import load_model

    loader = partial(load_model, device=resolve_device(device), precision=check_precision(precision))
    registry = Registry(runs, model=model, loader=loader)
    for entry in registry.entries.values():
        if entry.usable:
            print(f"run {entry.key}: {len(entry.run):,} images, model {entry.run.manifest['model']['spec']}"
                  + (f" ({entry.labels_note})" if entry.labels_note else f", {len(entry.labels)} labelled heads"))
        else:
            print(f"run {entry.key} ({entry.path}) is unavailable: {entry.error}", file=sys.stderr)
    if registry.first_usable() is None:
        raise ClipInterpretError("none of the runs can be served: "
                                 + "; ".join(f"{e.key}: {e.error}" for e in registry.entries.values()))
    from .ui import CSS, build

    demo = build(registry)
    demo.queue(default_concurrency_limit=max(1, concurrency))
    try:
        return demo.launch(server_name=host, server_port=port, share=False, max_file_size=int(max_upload_mb * 2**20),
                           prevent_thread_lock=not block, ssr_mode=False, inbrowser=False, css=CSS,
                           footer_links=["gradio", "settings"])
    except OSError as err:  # port taken, address not on this machine, ...
        raise ClipInterpretError(f"cannot serve on {host}:{port}: {err}") from None


__all__ = ["Registry", "serve"]
