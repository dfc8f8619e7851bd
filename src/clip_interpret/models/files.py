"""Checkpoint files: reading a state dict (safetensors, torch, TorchScript), checking that it fits an
architecture, and the sha256 of a file."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError


def read_state_dict(path: Path, spec: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (safetensors, torch or TorchScript), or a clear error naming it."""
    import open_clip  # its reader only: no model configs needed

    try:
        state = open_clip.factory.load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 - any reader failure means "not a checkpoint we can read"
        try:  # TorchScript archives (OpenAI's original .pt files)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
        except Exception:  # noqa: BLE001
            raise ModelLoadError(f"cannot read checkpoint {path} (spec {spec!r}): {err}") from None
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"checkpoint {path} (spec {spec!r}) holds no state dict")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint of another architecture, naming the first mismatched tensor and both shapes."""
    expected = model.state_dict()
    resized = ("positional_embedding",)  # open_clip interpolates these to the model's grid / context
    for name, tensor in expected.items():
        if name not in state:
            if name.endswith(("logit_bias", "position_ids")):
                continue
            raise ModelLoadError(f"checkpoint {source} does not fit this architecture: tensor {name!r} "
                                 f"(shape {list(tensor.shape)}) is missing from the checkpoint")
        theirs = state[name]
        scalar_like = name in ("logit_scale", "logit_bias") and theirs.numel() == tensor.numel()
        if tuple(theirs.shape) != tuple(tensor.shape) and not name.endswith(resized) and not scalar_like:
            raise ModelLoadError(f"checkpoint {source} is for another architecture: tensor {name!r} has shape "
                                 f"{list(theirs.shape)} in the checkpoint but {list(tensor.shape)} in the model")
    extra = [name for name in state if name not in expected and not name.endswith("position_ids")]
    if extra:
        raise ModelLoadError(f"checkpoint {source} is for another architecture: it has tensor {extra[0]!r} "
                             f"(shape {list(state[extra[0]].shape)}) that the model does not have")


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
