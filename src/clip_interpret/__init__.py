"""clip-interpret: open up CLIP-like vision-language models head by head.

The public names are imported on first use (``clip_interpret.load_model`` imports torch then), so that
``import clip_interpret`` is light: the command line builds its parser and prints help without torch.
"""

import sys
import types
from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "ClipInterpretError": ".errors",
    "ClipModel": ".models",
    "Decomposition": ".decompose",
    "HookedViT": ".models",
    "debias": ".debias",
    "decompose": ".decompose",
    "edit_head": ".spectra",
    "head_spectra": ".spectra",
    "load_image": ".images",
    "load_images": ".images",
    "load_model": ".models",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name], __name__), name)
        if name not in ("decompose", "debias"):  # functions; the package class below keeps them from the submodules
            globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """``clip_interpret.decompose`` (and ``debias``) is the function, as before, even once the submodule of that
    name is imported (the import system then sets the package's attribute to the submodule; this ignores it)."""

    @property
    def decompose(self):
        return import_module(".decompose", __name__).decompose

    @decompose.setter
    def decompose(self, value):
        pass

    @property
    def debias(self):
        return import_module(".debias", __name__).debias

    @debias.setter
    def debias(self, value):
        pass


sys.modules[__name__].__class__ = _Package
