"""The old name of ``clip_interpret.runstore`` (the run store: image sources, run directories,
indexing), kept so that ``clip_interpret.index`` and its modules (``clip_interpret.index.store``,
...) go on working for a release; import ``clip_interpret.runstore`` instead."""

import sys

from ..runstore import ImageSource, Run, index_images, open_run, open_source  # noqa: F401
from ..runstore import build, distributed, sources, store

for _module in (build, distributed, sources, store):  # the old module paths name the same modules
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

__all__ = ["ImageSource", "Run", "index_images", "open_run", "open_source"]
