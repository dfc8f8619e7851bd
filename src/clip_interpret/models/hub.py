"""Reaching the network for weights and tokenizers, or failing in seconds when it cannot be reached.

Weights or tokenizers that are not on disk need the internet; the probe (a short connection to
``PROBE_HOST``) runs before any download, so that an offline machine fails at once with a
message naming the spec and how to point at a local file.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelLoadError

PROBE_HOST = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 3.0


def offline_flag() -> bool:
    """Whether an offline mode is set in the environment."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("CLIP_INTERPRET_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def internet_reachable() -> bool:
    """Whether ``PROBE_HOST`` answers within ``PROBE_TIMEOUT_S``."""
    try:
        with socket.create_connection(PROBE_HOST, timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def require_internet(spec: str, local_hint: str, what: str = "its weights are") -> None:
    """Raise at once if a download cannot work, naming the spec, what is missing and the local alternative."""
    why = "offline mode is set (HF_HUB_OFFLINE / CLIP_INTERPRET_OFFLINE)" if offline_flag() else \
        f"the internet is not reachable ({PROBE_HOST[0]} did not answer within {PROBE_TIMEOUT_S:g} s)"
    if offline_flag() or not internet_reachable():
        raise ModelLoadError(f"cannot load {spec!r}: {what} not on this machine and {why}. {local_hint}")


def require_tokenizer(spec: str, name: str, load: Callable[..., Any]):
    """Load a Hugging Face tokenizer from the local cache, else (when it can be reached) the Hub; else one
    clear error naming it and how to pass it."""
    hint = (f"Download it once (`huggingface-cli download {name}`) into the Hugging Face cache, or pass a folder "
            "holding its files: load_model(spec, tokenizer='/path/to/folder') or --tokenizer /path/to/folder")
    try:
        return load(local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not readable): try the Hub below
        pass
    require_internet(spec, hint, what=f"its text tower's tokenizer {name!r} is")
    try:
        return load()
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer {name!r} of {spec!r}: {err}. {hint}") from None


def tokenizer_folder(spec: str, folder, load: Callable[..., Any]):
    """A tokenizer loaded by ``load`` from a local folder of Hugging Face tokenizer files, or one clear error."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"tokenizer folder not found: {path} (for {spec!r}); pass a folder holding a Hugging "
                             "Face tokenizer's files (tokenizer.json or the vocabulary files it names)")
    try:
        return load(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{path} does not hold a readable Hugging Face tokenizer (for {spec!r}): {err}") from None
