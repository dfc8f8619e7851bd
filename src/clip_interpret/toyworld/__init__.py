"""The known-answer world and the small CLIP trained on it (the bundled ``toy`` model)."""

from . import source  # registers the toyworld:N[:seed] image source
from .pool import toy_pool
from .world import PROPERTIES, ToyImage, ToyWorld, export, generate, property_name, spurious

__all__ = ["PROPERTIES", "ToyImage", "ToyWorld", "export", "generate", "property_name", "spurious", "toy_pool"]
