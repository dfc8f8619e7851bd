"""load_model: a spec string (or an in-memory model) -> ClipModel, the one factory over the backends.

Each backend is a module of its own: ``openclip`` (open_clip architectures, native and timm
towers), ``hf`` (Hugging Face CLIP and SigLIP), ``toy`` (the bundled toy CLIP), ``files``
(checkpoint files); ``hub`` reaches the network (or fails in seconds offline) and
``clip_model`` is what every backend returns. Adding a family means adding its backend (or its
configs and converter) and a branch here. The names below from the backends stay importable
from here, where they lived before the split.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from .clip_model import DEFAULT_LOGIT_SCALE, ClipModel, TextEncoder  # noqa: F401
from .files import check_state_dict, read_state_dict, sha256_file  # noqa: F401
from .hf import HF_CLASSES, load_hf, wrap_hf  # noqa: F401
from .hub import PROBE_HOST, PROBE_TIMEOUT_S, require_internet  # noqa: F401
from .openclip import (  # noqa: F401
    CONFIG_DIR,
    RANDOM_INIT_SEED,
    arch_preprocess_cfg,
    create_open_clip,
    load_open_clip,
    open_clip_architectures,
    open_clip_preprocess,
    open_clip_tokenizer,
    registered_open_clip,
    tower_problem,
    wrap_open_clip,
)
from .spec import parse_spec
from .toy import TOY_WEIGHTS, load_toy  # noqa: F401

PAPER_MODELS = (
    "open_clip:ViT-B-16/openai",
    "open_clip:ViT-B-32/openai",
    "open_clip:ViT-L-14/openai",
    "open_clip:ViT-B-16/laion2b_s34b_b88k",
    "open_clip:ViT-B-32/datacomp_m_s128m_b4k",
    "open_clip:ViT-L-14/laion2b_s32b_b82k",
)


def load_model(spec: Any, tokenizer=None, device: str | torch.device = "auto", precision: str = "fp32") -> ClipModel:
    """Load a CLIP-like model into a ClipModel.

    ``spec`` is a spec string (see ``clip_interpret.models.spec``) or an
    already-built open_clip ``CLIP`` / Hugging Face ``CLIPModel``, ``SiglipModel`` or
    ``Siglip2Model``. Every model gets its own tokenizer (open_clip's for the architecture,
    the Hugging Face model's); ``tokenizer`` replaces it: a tokenizer object (open_clip's or
    Hugging Face's), or a local folder of Hugging Face tokenizer files, which is how a
    tokenizer that is not on this machine is passed offline. A given tokenizer must fit the text
    tower (a vocabulary no larger than its token embeddings). When no tokenizer can be had (a
    SigLIP without its tokenizer files, an architecture whose Hugging Face tokenizer is not on
    this machine offline, an in-memory open_clip model whose text tower is not the CLIP BPE's),
    the model is loaded image-only with a one-line warning: image work runs, and every text call
    (``encode_text``, zero-shot, TextSpan) is one error saying how to pass the tokenizer.
    ``device``: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``;
    ``precision``: compute precision ``fp32``, ``bf16`` or ``fp16`` (docs/decomposition.md).
    Whatever the device, every result handed back is on the CPU.
    """
    from ..device import check_precision, resolve_device

    device, precision = resolve_device(device), check_precision(precision)  # bad values fail before loading
    if isinstance(spec, ClipModel):
        return _place(spec, device, precision)
    if isinstance(spec, nn.Module):
        kind = type(spec).__name__
        if hasattr(spec, "visual") and hasattr(spec, "encode_text"):
            model = wrap_open_clip(f"<in-memory open_clip {kind}>", spec, tokenizer, note="in-memory open_clip model",
                                    in_memory=True)
        elif hasattr(spec, "vision_model") and hasattr(spec, "get_text_features"):
            model = wrap_hf(f"<in-memory Hugging Face {kind}>", spec, tokenizer=tokenizer, note="in-memory HF model")
        else:
            raise ModelLoadError(f"cannot use a {kind} as a CLIP model; pass an open_clip CLIP, a Hugging Face "
                                 "CLIPModel / SiglipModel or a spec string")
        return _place(model, device, precision)
    if not isinstance(spec, str):
        raise ModelLoadError(f"expected a model spec string or a model object, got {type(spec).__name__}")
    parsed = parse_spec(spec)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*QuickGELU.*")
        if parsed.source == "toy":
            model = load_toy(spec)
        elif parsed.source == "open_clip":
            model = load_open_clip(spec, parsed, tokenizer)
        else:
            model = load_hf(spec, parsed, tokenizer)
    return _place(model, device, precision)


def _place(model: ClipModel, device: torch.device, precision: str) -> ClipModel:
    """The model on ``device`` with compute ``precision``, both checked already by ``load_model``."""
    model.precision = precision
    return model.to(device)
