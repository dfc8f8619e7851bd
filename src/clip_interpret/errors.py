"""User-facing errors.

Every error that is the user's to fix (a bad spec, a missing file, an unreadable
image, a layer out of range) is a ``ClipInterpretError``: the command line prints
its message without a traceback and exits with status 2.
"""


class ClipInterpretError(Exception):
    """An error whose message tells the user what went wrong and what to do."""


class ModelLoadError(ClipInterpretError):
    """A model spec could not be turned into a model."""


class UnsupportedModelError(ModelLoadError):
    """The model exists but its image tower is not one we can decompose."""


class ImageLoadError(ClipInterpretError):
    """An image could not be read; ``source`` names it, ``reason`` says why."""

    def __init__(self, source, reason):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read image {source}: {reason}")
