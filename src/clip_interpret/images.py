"""Safe image loading and CLIP preprocessing.

``load_image`` turns a path, bytes, a PIL image or a numpy array into an RGB
PIL image: EXIF orientation applied; grayscale, palette, 16-bit, float and CMYK
images converted; transparency composited on white. Zero-byte, non-image,
corrupt and truncated files and decompression bombs are refused with an
``ImageLoadError`` naming the source.

``load_images`` does the same for a list and lets the caller choose what one
bad file does: ``on_error="raise"`` stops with the error, ``"skip"`` leaves the
file out and reports it in the returned failures list.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ClipInterpretError, ImageLoadError

# The largest image we accept, in pixels (PIL's own warning threshold, ~9459 x 9459).
MAX_PIXELS = 89_478_485

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def describe(source: Any) -> str:
    """A short human name for an image source, used in messages and results."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or f"<PIL image {source.size[0]}x{source.size[1]}>"
    if isinstance(source, np.ndarray):
        return f"<array {'x'.join(map(str, source.shape))} {source.dtype}>"
    return f"<{type(source).__name__}>"


def _open_bytes(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise ImageLoadError(name, "the file is empty (0 bytes)")
    previous = Image.MAX_IMAGE_PIXELS
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        Image.MAX_IMAGE_PIXELS = max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now, so truncation and corruption surface here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(name, f"too many pixels (decompression bomb guard, limit {max_pixels:,}): {err}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file, or a format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageLoadError(name, f"corrupt or truncated image data ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    return image


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageLoadError(name, f"array of shape {a.shape} is not an image; expected [H, W], [H, W, 3] or [H, W, 4]")
    if a.size == 0:
        raise ImageLoadError(name, "array is empty")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageLoadError(name, "array contains NaN or infinite values")
        if a.min() < 0 or a.max() > 1:
            raise ImageLoadError(name, "float arrays must hold values in [0, 1]")
        a = (a * 255).round().astype(np.uint8)
    else:
        raise ImageLoadError(name, f"unsupported array dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit and float scaled to 8-bit, transparency on white, CMYK converted."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and a.max() > 255) else 255.0
        if mode == "F":
            top = 1.0 if a.max() <= 1.0 else 255.0
        a = np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(a, mode="L")
        mode = "L"
    if mode == "P" or (mode in ("L", "RGB") and "transparency" in image.info):  # palette, or a PNG tRNS colour key
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def load_image(source: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read one image from a path, bytes, PIL image or numpy array, as RGB."""
    name = describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(name, "no such file")
        if path.is_dir():
            raise ImageLoadError(name, "is a folder, not an image file")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ImageLoadError(name, f"cannot read the file ({err.strerror or err})") from None
        image = _open_bytes(data, name, max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open_bytes(bytes(source), name, max_pixels)
    elif isinstance(source, Image.Image):
        image = source
        if image.size[0] * image.size[1] > max_pixels:
            raise ImageLoadError(name, f"too many pixels ({image.size[0]}x{image.size[1]}, limit {max_pixels:,})")
    elif isinstance(source, np.ndarray):
        image = _from_array(source, name)
    else:
        raise ImageLoadError(name, "expected a file path, bytes, a PIL image or a numpy array")
    if image.size[0] == 0 or image.size[1] == 0:
        raise ImageLoadError(name, "image has zero width or height")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        pass
    return to_rgb(image)


@dataclass
class LoadFailure:
    """One source that could not be read, and why."""

    index: int
    source: str
    reason: str


def load_images(sources: Iterable[Any], on_error: str = "raise", max_pixels: int = MAX_PIXELS):
    """Load many images. Returns ``(images, kept_indices, failures)``.

    ``on_error="raise"`` raises the first ``ImageLoadError``; ``"skip"`` leaves
    bad sources out and lists them as ``LoadFailure`` records.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    images, kept, failures = [], [], []
    for index, source in enumerate(sources):
        try:
            images.append(load_image(source, max_pixels=max_pixels))
            kept.append(index)
        except ImageLoadError as err:
            if on_error == "raise":
                raise
            failures.append(LoadFailure(index, err.source, err.reason))
    return images, kept, failures


@dataclass(frozen=True)
class Preprocess:
    """CLIP preprocessing: resize the shortest side, centre crop, normalise.

    Written with PIL and numpy so that it is fully described by its fields (the
    run manifest records them) and matches open_clip's and Hugging Face's
    default CLIP transforms.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)

    def _resample(self):
        modes = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}
        if self.interpolation not in modes:
            raise ClipInterpretError(f"unknown interpolation {self.interpolation!r}; choose one of {sorted(modes)}")
        return modes[self.interpolation]

    def crop(self, image: Image.Image) -> Image.Image:
        """Resize (shortest side) and centre-crop to ``image_size``; the image the model sees."""
        th, tw = self.image_size
        w, h = image.size
        if (w, h) != (tw, th):
            short = min(th, tw) if th == tw else None
            if short is not None:
                scale = short / min(w, h)
                nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            else:
                scale = max(th / h, tw / w)
                nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
            if (nw, nh) != (w, h):
                image = image.resize((nw, nh), self._resample())
            left = int(round((nw - tw) / 2.0))
            top = int(round((nh - th) / 2.0))
            image = image.crop((left, top, left + tw, top + th))
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised tensor [3, H, W]."""
        image = self.crop(to_rgb(image))
        a = np.asarray(image, dtype=np.float32) / 255.0
        a = (a - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])
