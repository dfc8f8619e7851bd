"""Index an image collection into a run directory, and read runs back."""

from .build import index_images
from .sources import ImageSource, open_source
from .store import Run, open_run

__all__ = ["ImageSource", "Run", "index_images", "open_run", "open_source"]
