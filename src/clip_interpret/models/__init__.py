"""Model loading: spec strings and in-memory models -> ClipModel with a HookedViT."""

from .hooked_vit import HookedViT, ViTConfig
from .loader import PAPER_MODELS, ClipModel, TextEncoder, load_model, open_clip_architectures
from .spec import ModelSpec, parse_spec

__all__ = ["PAPER_MODELS", "ClipModel", "HookedViT", "ModelSpec", "TextEncoder", "ViTConfig", "load_model",
           "open_clip_architectures", "parse_spec"]
