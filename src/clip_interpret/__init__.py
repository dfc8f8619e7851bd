"""clip-interpret: open up CLIP-like vision-language models head by head."""

from .decompose import Decomposition, decompose
from .errors import ClipInterpretError
from .images import load_image, load_images
from .models import ClipModel, HookedViT, load_model
from .toyworld import source as _toyworld_source  # noqa: F401  (registers the toyworld: image source)

__version__ = "0.1.0"

__all__ = [
    "ClipInterpretError",
    "ClipModel",
    "Decomposition",
    "HookedViT",
    "decompose",
    "load_image",
    "load_images",
    "load_model",
    "__version__",
]
