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
import re
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
RESIZE_MODES = ("shortest", "squash")  # open_clip's names: shortest side + centre crop; resize to the input size


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


def _open_bytes(data: bytes, name: str, max_pixels: int, draft: int | None = None) -> Image.Image:
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
            if draft and image.format == "JPEG":
                image.draft(None, (draft, draft))  # DCT-domain downscale by 2, 4 or 8 while keeping >= draft
            image.load()  # decode now, so truncation and corruption surface here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own text quotes twice our limit beyond 2x (its error zone): say the size and our limit only
        Image.MAX_IMAGE_PIXELS = None  # the header again, to name the size (nothing is decoded)
        try:
            w, h = Image.open(io.BytesIO(data)).size
            size = f"{w}x{h} = {w * h:,}"
        except Exception:  # noqa: BLE001 - the size is a courtesy
            size = "more than the limit"
        raise ImageLoadError(name, f"too many pixels ({size}; the limit is {max_pixels:,} pixels, a guard against "
                                   "decompression bombs)") from None
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


def load_image(source: Any, max_pixels: int = MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Read one image from a path, bytes, PIL image or numpy array, as RGB.

    ``draft``: a JPEG file at least twice this size on both sides is decoded at 1/2, 1/4 or
    1/8 scale (JPEG draft mode), keeping both sides >= ``draft``; much faster for photos
    far larger than the model's input, and slightly different pixels (docs/pipeline.md).
    """
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
        image = _open_bytes(data, name, max_pixels, draft)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open_bytes(bytes(source), name, max_pixels, draft)
    elif isinstance(source, Image.Image):
        image = source
        if image.size[0] * image.size[1] > max_pixels:
            w, h = image.size
            raise ImageLoadError(name, f"too many pixels ({w}x{h} = {w * h:,}; the limit is {max_pixels:,} pixels, a "
                                       "guard against decompression bombs)")
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


# ----------------------------------------------------------- EXIF orientation without Pillow
EXIF_ORIENTATION = 0x0112
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)([0-9])')  # as Pillow reads it


def jpeg_orientation(data) -> int:
    """The EXIF orientation (1-8) of a JPEG file's bytes, read from its header without decoding it.

    For decoders that do not apply it (torchvision's CUDA decoder): the rotation or flip is then
    done by ``apply_orientation``. Reads the orientation the way Pillow does (``ImageOps.exif_transpose``,
    the CPU path): the tag in the first IFD of the Exif segment(s), else an XMP ``tiff:Orientation``.
    Never raises: an absent, out-of-range or unreadable tag (truncated block, offsets out of bounds,
    not a TIFF header, wrong type) is 1, and at most the segments before the image data are read.
    """
    try:
        if isinstance(data, torch.Tensor):
            data = data.numpy()
        view = memoryview(data).cast("B")
        exif, xmp = _jpeg_header_blocks(view)
        orientation = _tiff_orientation(exif) if exif is not None else None
        if orientation is None and xmp is not None:  # no Exif tag at all: Pillow then reads XMP's
            found = _XMP_ORIENTATION.search(xmp)
            orientation = int(found[1]) if found else None
        return orientation if orientation is not None and 1 <= orientation <= 8 else 1
    except Exception:  # noqa: BLE001 - a hostile header never stops a run; unreadable means upright
        return 1


def _jpeg_header_blocks(data: memoryview) -> tuple[bytes | None, bytes | None]:
    """(the TIFF block of the Exif APP1 segments, the last XMP packet) of a JPEG, each None if absent."""
    if bytes(data[:2]) != b"\xff\xd8":
        return None, None
    exif, xmp = None, None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            break  # not a marker where one must be: stop reading, keep what was found
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no header segment after this
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            break
        segment = bytes(data[pos + 4:pos + 2 + length])  # 64 KiB at most
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            exif = segment[6:] if exif is None else exif + segment[6:]  # Pillow joins split blocks
        elif marker == 0xE1 and segment.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
            xmp = segment.split(b"\x00", 1)[1]
        pos += 2 + length
    return exif, xmp


# The headers that Pillow reads as a classic TIFF: 42 in the stated byte order, 42 in the other
# (a common camera bug), and "MM" with 43 (BigTIFF's number, which Pillow's check misses in big-endian).
_CLASSIC_TIFF = (b"MM\x00\x2a", b"II\x2a\x00", b"MM\x2a\x00", b"II\x00\x2a", b"MM\x00\x2b")


def _tiff_orientation(tiff: bytes) -> int | None:
    """The value of the Orientation entry in the first IFD of a TIFF (Exif) block (its first value if
    it has several), None when the IFD has no readable such entry. Raises on a block that is not TIFF."""
    if not tiff:
        return None
    if len(tiff) < 8 or tiff[:4] not in _CLASSIC_TIFF:
        raise ValueError("not a TIFF header")
    order = "little" if tiff[:2] == b"II" else "big"

    def number(at: int, size: int) -> int:
        return int.from_bytes(tiff[at:at + size], order)

    ifd = number(4, 4)
    if ifd + 2 > len(tiff):
        return None  # the first IFD is out of the block: no entries
    entries = min(number(ifd, 2), (len(tiff) - ifd - 2) // 12)  # a count beyond the block: what is there
    orientation = None
    for k in range(entries):
        entry = ifd + 2 + 12 * k
        if number(entry, 2) != EXIF_ORIENTATION:
            continue
        kind, count = number(entry + 2, 2), number(entry + 4, 4)
        size = {1: 1, 3: 2, 4: 4, 8: 2, 9: 4}.get(kind)  # BYTE, SHORT, LONG, SSHORT, SLONG
        at = entry + 8 if size is not None and count * size <= 4 else number(entry + 8, 4)  # inline, or where
        if size is None or count == 0 or at + count * size > len(tiff):
            continue  # an entry Pillow skips (unknown type, no values, values out of the block)
        orientation = number(at, size)  # the first value; and the last such entry counts, as in Pillow
    return orientation


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """An image tensor [..., H, W] as shown upright for its EXIF ``orientation`` (1-8), on its own
    device: what ``ImageOps.exif_transpose`` does to a PIL image. 1 or any other value: unchanged."""
    if orientation == 2:  # mirrored left-right
        return image.flip(-1)
    if orientation == 3:  # turned 180 degrees
        return image.flip((-2, -1))
    if orientation == 4:  # mirrored top-bottom
        return image.flip(-2)
    if orientation == 5:  # mirrored along the main diagonal
        return image.transpose(-2, -1).contiguous()  # a copy, as the other turns make
    if orientation == 6:  # shown turned 90 degrees clockwise
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:  # mirrored along the other diagonal
        return image.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:  # shown turned 90 degrees counter-clockwise
        return image.transpose(-2, -1).flip(-2)
    return image


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
    """CLIP preprocessing: resize the shortest side, centre crop, normalise (or, with
    ``resize_mode="squash"``, SigLIP's: resize to the input size whatever the aspect ratio).

    Written with PIL and numpy so that it is fully described by its fields (the
    run manifest records them) and matches open_clip's and Hugging Face's
    default CLIP and SigLIP transforms.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ClipInterpretError(f"unknown resize mode {self.resize_mode!r}; choose one of "
                                     f"{', '.join(RESIZE_MODES)}")

    def to_dict(self) -> dict:
        """The fields; ``resize_mode`` only when it is not the default, so that the runs written
        before it existed keep their recorded preprocessing."""
        fields = asdict(self)
        if self.resize_mode == "shortest":
            del fields["resize_mode"]
        return fields

    def _resample(self):
        modes = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}
        if self.interpolation not in modes:
            raise ClipInterpretError(f"unknown interpolation {self.interpolation!r}; choose one of {sorted(modes)}")
        return modes[self.interpolation]

    @property
    def draft_size(self) -> int:
        """The smallest side a JPEG may be draft-decoded to (the larger side of the crop)."""
        return max(self.image_size)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize (shortest side, or squashed to the input), before the centre crop."""
        th, tw = self.image_size
        if self.resize_mode == "squash":
            return tw, th
        if th == tw:
            short = th
            return (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        scale = max(th / height, tw / width)
        return max(tw, round(width * scale)), max(th, round(height * scale))

    def crop_box(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop in the resized image."""
        th, tw = self.image_size
        return int(round((width - tw) / 2.0)), int(round((height - th) / 2.0))

    def crop(self, image: Image.Image) -> Image.Image:
        """Resize and centre-crop to ``image_size``; the image the model sees."""
        th, tw = self.image_size
        w, h = image.size
        if (w, h) != (tw, th):
            nw, nh = self.resized_size(w, h)
            if (nw, nh) != (w, h):
                image = image.resize((nw, nh), self._resample())
            left, top = self.crop_box(nw, nh)
            image = image.crop((left, top, left + tw, top + th))
        return image

    def crop_uint8(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> the crop as uint8 [3, H, W] (what travels to the device)."""
        a = np.asarray(self.crop(to_rgb(image)), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def crop_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """The same resize and centre crop on a uint8 image tensor [3, h, w] on any device
        (torchvision's antialiased resampling; within a few grey levels of Pillow's)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2.functional import resize

        th, tw = self.image_size
        h, w = image.shape[-2:]
        if (w, h) != (tw, th):
            nw, nh = self.resized_size(w, h)
            if (nw, nh) != (w, h):
                image = resize(image, [nh, nw], interpolation=InterpolationMode(self.interpolation), antialias=True)
            left, top = self.crop_box(nw, nh)
            image = image[:, top:top + th, left:left + tw]
        return image.contiguous()

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops [..., 3, H, W] on any device -> normalised float32 pixels, on that device."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=crops.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=crops.device).view(3, 1, 1)
        return (crops.float() / 255.0 - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised tensor [3, H, W]."""
        return self.normalise(self.crop_uint8(image))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])
