"""The run store: image sources, run directories (manifest + shards) and indexing a collection into one;
reading runs back (``Run``)."""

from .build import index_images
from .sources import ImageSource, open_source
from .store import Run, open_run

__all__ = ["ImageSource", "Run", "index_images", "open_run", "open_source"]
