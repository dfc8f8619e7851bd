"""Tests for clip_interpret.images: safe loading, mode conversion, preprocessing.

Every image is made here (PIL, io.BytesIO, tmp_path); nothing is downloaded.
Expected pixel values are worked out from the image that was written, never
copied from the code under test.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from clip_interpret.errors import ClipInterpretError, ImageLoadError
from clip_interpret.images import (
    MAX_PIXELS,
    OPENAI_MEAN,
    OPENAI_STD,
    LoadFailure,
    Preprocess,
    apply_orientation,
    jpeg_orientation,
    load_image,
    load_images,
)

ORIENTATION = 0x0112  # the EXIF Orientation tag


# ---------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), (x + y) / max(w + h - 2, 1)], axis=-1)
    return Image.fromarray((a * 255).round().astype(np.uint8))


def solid(color, size=(6, 4), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A PNG (8-bit RGB) whose IHDR claims width x height.

    ``rows`` is the raw (filtered) pixel data; by default a few bytes only, so a
    huge claimed size costs nothing to build and only the header is honest.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_names(err: pytest.ExceptionInfo, source) -> None:
    """The error's message and its ``source`` both name the bad input."""
    assert str(source) in str(err.value)
    assert err.value.source == str(source)


# ---------------------------------------------------------------- sources


def test_every_source_kind_gives_the_same_rgb_pixels(tmp_path):
    original = noise(23, 17)  # non-square, so a width/height swap would show
    data = encode(original, "PNG")  # lossless
    path = write(tmp_path, "noise.png", data)
    expected = np.asarray(original)
    sources = {
        "str path": str(path),
        "Path": path,
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "PIL": original,
        "array": expected.copy(),
    }
    for kind, source in sources.items():
        image = load_image(source)
        assert isinstance(image, Image.Image), kind
        assert image.mode == "RGB", kind
        assert image.size == (23, 17), kind
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=kind)


def test_format_is_sniffed_from_content_not_extension(tmp_path):
    original = noise(9, 5, seed=1)
    path = write(tmp_path, "really_a_png.jpg", encode(original, "PNG"))
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(original))


@pytest.mark.parametrize("source", [42, None, ["a.png"], {"path": "a.png"}])
def test_unsupported_source_type_is_refused(source):
    with pytest.raises(ImageLoadError, match="expected a file path, bytes, a PIL image or a numpy array"):
        load_image(source)


# ---------------------------------------------------------------- EXIF orientation


def _marked(w=40, h=20) -> Image.Image:
    """Blue w x h image with a red 10x10 block in the stored top-left corner."""
    image = Image.new("RGB", (w, h), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    return image


def _jpeg_with_orientation(orientation: int | None) -> bytes:
    if orientation is None:
        return encode(_marked(), "JPEG", quality=95)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(_marked(), "JPEG", quality=95, exif=exif.tobytes())


def _red_corner(image: Image.Image) -> str:
    """Which corner of the displayed image holds the red block."""
    a = pixels(image)
    h, w = a.shape[:2]
    corners = {
        "top-left": a[:8, :8], "top-right": a[:8, w - 8:],
        "bottom-left": a[h - 8:, :8], "bottom-right": a[h - 8:, w - 8:],
    }
    red = [name for name, block in corners.items() if block[..., 0].mean() > 200 and block[..., 2].mean() < 60]
    assert len(red) == 1, f"expected one red corner, found {red}"
    return red[0]


# Orientation 6 means the stored image must be turned 90 degrees clockwise to be
# shown upright; 8 means 90 counter-clockwise; 3 means 180 degrees.
@pytest.mark.parametrize(
    "orientation, size, corner",
    [
        (None, (40, 20), "top-left"),
        (1, (40, 20), "top-left"),
        (3, (40, 20), "bottom-right"),
        (6, (20, 40), "top-right"),
        (8, (20, 40), "bottom-left"),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, corner):
    data = _jpeg_with_orientation(orientation)
    path = write(tmp_path, f"orient_{orientation}.jpg", data)
    for source in (path, data, Image.open(io.BytesIO(data))):
        image = load_image(source)
        assert image.size == size
        assert _red_corner(image) == corner


def test_broken_exif_block_does_not_lose_the_image():
    data = encode(_marked(), "JPEG", quality=95, exif=b"Exif\x00\x00this is not a TIFF header at all")
    image = load_image(data)
    assert image.size == (40, 20)
    assert _red_corner(image) == "top-left"


# ------------------------------------- EXIF orientation without Pillow (for the GPU JPEG decoder)
# torchvision's CUDA decoder has no EXIF option: jpeg_orientation reads the tag from the header and
# apply_orientation turns the decoded tensor. Both are checked against Pillow (ImageOps.exif_transpose,
# what load_image does), never against themselves.

def _tiff(order: bytes, entries, count=None, ifd=8, magic=42) -> bytes:
    """An Exif block: TIFF header in byte order ``order`` (b"II" little-, b"MM" big-endian), one IFD of
    ``entries`` (tag, type, count, value: bytes, an int stored as that type, or ("at", offset)) claiming
    ``count`` entries."""
    e = "<" if order == b"II" else ">"
    block = order + struct.pack(e + "HI", magic, ifd) + struct.pack(e + "H", len(entries) if count is None else count)
    for tag, kind, n, value in entries:
        if isinstance(value, int):
            value = struct.pack(e + {1: "B", 3: "H", 4: "I"}[kind], value)
        elif isinstance(value, tuple):  # ("at", offset): the values are stored elsewhere
            value = struct.pack(e + "I", value[1])
        block += struct.pack(e + "HHI", tag, kind, n) + value.ljust(4, b"\x00")
    return b"Exif\x00\x00" + block + struct.pack(e + "I", 0)


def _stored() -> Image.Image:
    """A non-square photo-like image (a width/height swap and any flip show)."""
    return Image.fromarray(np.clip(np.asarray(gradient(48, 32)).astype(int) + np.asarray(noise(48, 32)) // 8, 0, 255)
                           .astype(np.uint8))


def _jpeg(exif: bytes | None = None, **kwargs) -> bytes:
    return encode(_stored(), "JPEG", quality=95, **({"exif": exif} if exif is not None else {}), **kwargs)


def _gpu_like(data: bytes) -> torch.Tensor:
    """What the device path makes of a JPEG: torchvision's decoder without EXIF (as on CUDA), then our turn."""
    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at torchcodec
        decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return apply_orientation(decoded, jpeg_orientation(data))


def _assert_agrees_with_pillow(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about some of the hostile blocks
        expected = torch.from_numpy(np.array(load_image(data))).permute(2, 0, 1)
    ours = _gpu_like(data)
    assert ours.shape == expected.shape
    assert (ours.int() - expected.int()).abs().max() <= 2  # two JPEG decoders (measured: 0 on these files)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_turns_a_tensor_as_pillow_turns_the_image(orientation):
    stored = noise(7, 5, seed=orientation)
    pil = stored.copy()
    pil.getexif()[ORIENTATION] = orientation
    expected = torch.from_numpy(np.array(ImageOps.exif_transpose(pil))).permute(2, 0, 1)
    tensor = torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1)
    assert torch.equal(apply_orientation(tensor, orientation), expected)
    batch = torch.stack([tensor, tensor.flip(0)])  # [N, 3, H, W] too
    assert torch.equal(apply_orientation(batch, orientation), torch.stack([expected, expected.flip(0)]))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_jpeg_turned_by_its_header_tag_matches_the_cpu_loader(orientation):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = _jpeg(exif.tobytes())
    assert jpeg_orientation(data) == orientation
    assert jpeg_orientation(np.frombuffer(data, np.uint8)) == orientation  # the pipeline's buffers
    assert jpeg_orientation(torch.frombuffer(bytearray(data), dtype=torch.uint8)) == orientation
    expected_size = (48, 32) if orientation <= 4 else (32, 48)
    assert load_image(data).size == expected_size
    _assert_agrees_with_pillow(data)


def test_orientation_without_exif_and_from_xmp_as_pillow_reads_it():
    assert jpeg_orientation(_jpeg()) == 1
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    data = _jpeg(xmp=xmp)
    assert jpeg_orientation(data) == 8 and load_image(data).size == (32, 48)
    _assert_agrees_with_pillow(data)
    exif = Image.Exif()
    exif[ORIENTATION] = 3  # an Exif tag wins over XMP
    data = _jpeg(exif.tobytes(), xmp=xmp)
    assert jpeg_orientation(data) == 3
    _assert_agrees_with_pillow(data)


TAG = ORIENTATION
HOSTILE_EXIF = {  # name: (block builder for a byte order, the orientation Pillow applies)
    "plain SHORT": (lambda o: _tiff(o, [(TAG, 3, 1, 6)]), 6),
    "LONG": (lambda o: _tiff(o, [(TAG, 4, 1, 8)]), 8),
    "among other tags": (lambda o: _tiff(o, [(0x010F, 2, 4, b"Cam\x00"), (TAG, 3, 1, 5), (0x0131, 2, 1, b"x")]), 5),
    "two values inline: the first": (lambda o: _tiff(o, [(TAG, 3, 2, struct.pack("<HH" if o == b"II" else ">HH",
                                                                                 7, 2))]), 7),
    "huge IFD count, one real entry": (lambda o: _tiff(o, [(TAG, 3, 1, 6)], count=0xFFFF), 6),
    "IFD offset beyond the block": (lambda o: _tiff(o, [(TAG, 3, 1, 6)], ifd=0xFFFFFFF0), 1),
    "IFD offset into the header": (lambda o: _tiff(o, [(TAG, 3, 1, 6)], ifd=0), 1),
    "values at an offset beyond the block": (lambda o: _tiff(o, [(TAG, 3, 3, ("at", 0x7FFFFFF0))]), 1),
    "truncated inside the entry": (lambda o: _tiff(o, [(TAG, 3, 1, 6)])[:6 + 14], 1),
    "truncated after the header": (lambda o: _tiff(o, [(TAG, 3, 1, 6)])[:6 + 8], 1),
    "half a header": (lambda o: _tiff(o, [(TAG, 3, 1, 6)])[:6 + 5], 1),
    "wrong TIFF magic": (lambda o: _tiff(o, [(TAG, 3, 1, 6)], magic=0x2B2B), 1),
    "42 in the other byte order": (lambda o: _tiff(o, [(TAG, 3, 1, 6)], magic=0x2A00), 6),
    "BigTIFF's 43": (lambda o: _tiff(o, [(TAG, 3, 1, 6)], magic=43), {b"II": 1, b"MM": 6}),  # as Pillow reads it
    "value 0": (lambda o: _tiff(o, [(TAG, 3, 1, 0)]), 1),
    "value 9": (lambda o: _tiff(o, [(TAG, 3, 1, 9)]), 1),
    "value 65535": (lambda o: _tiff(o, [(TAG, 3, 1, 0xFFFF)]), 1),
    "ASCII type": (lambda o: _tiff(o, [(TAG, 2, 2, b"6\x00")]), 1),
    "zero values": (lambda o: _tiff(o, [(TAG, 3, 0, 6)]), 1),
    "empty Exif block": (lambda o: b"Exif\x00\x00", 1),
    "not TIFF at all": (lambda o: b"Exif\x00\x00this is not a TIFF header at all", 1),
}


@pytest.mark.parametrize("order", [b"II", b"MM"], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("case", list(HOSTILE_EXIF))
def test_header_parser_on_hostile_exif_never_fails_and_agrees_with_pillow(case, order):
    build, expected = HOSTILE_EXIF[case]
    data = _jpeg(build(order))
    assert jpeg_orientation(data) == (expected[order] if isinstance(expected, dict) else expected)
    _assert_agrees_with_pillow(data)


def test_header_parser_on_hostile_jpeg_structure_returns_upright():
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = _jpeg(exif.tobytes())
    app1 = data.index(b"\xff\xe1")
    for cut in range(len(data)):  # every truncation of the file: the tag, or upright
        assert jpeg_orientation(data[:cut]) in ((6,) if cut >= app1 + 4 + 40 else (1, 6))
    head = data[:app1]
    for hostile in [
        b"", b"\xff", b"\xff\xd8", b"not a jpeg", encode(noise(4, 4), "PNG"),
        head + b"\xff\xe1\x00\x00" + data[app1 + 4:],  # a segment length under 2
        head + b"\xff\xe1\x00\x01" + data[app1 + 4:],
        head + b"\xff\xe1\xff\xff" + data[app1 + 4:app1 + 60],  # a length beyond the file
        head + b"\xff\xda" + data[app1:],  # the scan starts before the Exif segment: not a header any more
        b"\xff\xd8" + b"\xff" * 100_000,  # fill bytes only
        b"\xff\xd8" + b"\xff\xfe\x00\x02" * 20_000 + data[app1:],  # 20,000 empty comments, then the tag
    ]:
        assert jpeg_orientation(hostile) in (1, 6)
    assert jpeg_orientation(head + b"\xff\xda" + data[app1:]) == 1
    assert jpeg_orientation(b"\xff\xd8" + b"\xff\xfe\x00\x02" * 20_000 + data[app1:]) == 6
    rng = np.random.default_rng(0)
    for _ in range(300):  # random damage in the header: always a valid orientation
        damaged = bytearray(data)
        for at in rng.integers(2, app1 + 120, size=3):
            damaged[at] = rng.integers(0, 256)
        assert jpeg_orientation(bytes(damaged)) in range(1, 9)


# ---------------------------------------------------------------- mode conversion


def test_grayscale_is_replicated_to_three_channels():
    a = np.array([[0, 17, 128], [200, 254, 255]], dtype=np.uint8)
    out = pixels(load_image(Image.fromarray(a, mode="L")))
    assert out.shape == (2, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], a)


def test_one_bit_image_becomes_black_and_white():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    np.testing.assert_array_equal(pixels(load_image(image)), [[[0, 0, 0], [255, 255, 255]]])


def _over_white(color, alpha):
    a = alpha / 255.0
    return [c * a + 255 * (1 - a) for c in color]


@pytest.mark.parametrize("via_png", [False, True])
def test_rgba_is_composited_on_white(via_png):
    values = [(200, 10, 30, 0), (10, 20, 30, 255), (0, 100, 200, 128), (255, 0, 0, 64)]
    image = Image.new("RGBA", (4, 1))
    image.putdata(values)
    source = encode(image, "PNG") if via_png else image
    out = pixels(load_image(source))[0]
    for got, (r, g, b, a) in zip(out, values):
        np.testing.assert_allclose(got, _over_white((r, g, b), a), atol=1.01)
    # exact for the two ends: transparent -> white, opaque -> the colour itself
    np.testing.assert_array_equal(out[0], [255, 255, 255])
    np.testing.assert_array_equal(out[1], [10, 20, 30])


@pytest.mark.parametrize("via_png", [False, True])
def test_gray_alpha_is_composited_on_white(via_png):
    values = [(40, 0), (40, 255), (0, 128)]
    image = Image.new("LA", (3, 1))
    image.putdata(values)
    source = encode(image, "PNG") if via_png else image
    out = pixels(load_image(source))[0]
    np.testing.assert_array_equal(out[0], [255, 255, 255])
    np.testing.assert_array_equal(out[1], [40, 40, 40])
    np.testing.assert_allclose(out[2], _over_white((0, 0, 0), 128), atol=1.01)


def _palette_image(transparency=None) -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    image.putdata([0, 1, 2])
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


@pytest.mark.parametrize("fmt", [None, "PNG", "GIF"])
def test_palette_without_transparency(fmt):
    image = _palette_image()
    source = image if fmt is None else encode(image, fmt)
    np.testing.assert_array_equal(pixels(load_image(source)), [[[10, 20, 30], [200, 100, 50], [0, 255, 0]]])


@pytest.mark.parametrize("fmt", [None, "PNG", "GIF"])
def test_palette_with_transparent_index_is_white(fmt):
    image = _palette_image(transparency=1)
    source = image if fmt is None else encode(image, fmt)
    np.testing.assert_array_equal(pixels(load_image(source)), [[[10, 20, 30], [255, 255, 255], [0, 255, 0]]])


@pytest.mark.parametrize("via_png", [False, True])
def test_palette_with_per_entry_alpha(via_png):
    image = _palette_image(transparency=bytes([255, 0, 128]))
    source = encode(image, "PNG") if via_png else image
    out = pixels(load_image(source))[0]
    np.testing.assert_array_equal(out[0], [10, 20, 30])
    np.testing.assert_array_equal(out[1], [255, 255, 255])
    np.testing.assert_allclose(out[2], _over_white((0, 255, 0), 128), atol=1.01)


def test_png_colour_key_transparency_is_composited_on_white():
    """A PNG tRNS colour key on an L or RGB image marks those pixels transparent."""
    gray = Image.new("L", (2, 1), 10)
    gray.putpixel((1, 0), 99)
    out = pixels(load_image(encode(gray, "PNG", transparency=10)))[0]
    np.testing.assert_array_equal(out, [[255, 255, 255], [99, 99, 99]])

    rgb = Image.new("RGB", (2, 1), (10, 20, 30))
    rgb.putpixel((1, 0), (10, 20, 31))  # one off the key: must stay
    out = pixels(load_image(encode(rgb, "PNG", transparency=(10, 20, 30))))[0]
    np.testing.assert_array_equal(out, [[255, 255, 255], [10, 20, 31]])


SIXTEEN_BIT = np.array([[0, 257, 257 * 100, 65535, 30000]], dtype=np.uint16)
SIXTEEN_BIT_AS_8 = np.round(SIXTEEN_BIT.astype(float) * 255 / 65535)


def test_16_bit_grayscale_is_scaled_to_8_bit():
    image = Image.fromarray(SIXTEEN_BIT)
    assert image.mode == "I;16"
    out = pixels(load_image(image))
    for c in range(3):
        np.testing.assert_allclose(out[..., c], SIXTEEN_BIT_AS_8, atol=0.51)


def test_16_bit_png_file_is_scaled_to_8_bit(tmp_path):
    path = write(tmp_path, "deep.png", encode(Image.fromarray(SIXTEEN_BIT), "PNG"))
    out = pixels(load_image(path))
    np.testing.assert_allclose(out[..., 1], SIXTEEN_BIT_AS_8, atol=0.51)


def test_big_endian_16_bit_is_scaled_to_8_bit():
    image = Image.frombytes("I;16B", (5, 1), SIXTEEN_BIT.astype(">u2").tobytes())
    out = pixels(load_image(image))
    np.testing.assert_allclose(out[..., 2], SIXTEEN_BIT_AS_8, atol=0.51)


def test_int32_image_with_16_bit_range_is_scaled():
    image = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
    assert image.mode == "I"
    np.testing.assert_allclose(pixels(load_image(image))[..., 0], SIXTEEN_BIT_AS_8, atol=0.51)


def test_int32_image_with_8_bit_range_is_kept():
    a = np.array([[0, 1, 100, 255]], dtype=np.int32)
    image = Image.fromarray(a)
    assert image.mode == "I"
    np.testing.assert_array_equal(pixels(load_image(image))[..., 0], a)


def test_float_image_in_unit_range_is_scaled():
    a = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    image = Image.fromarray(a)
    assert image.mode == "F"
    np.testing.assert_allclose(pixels(load_image(image))[..., 1], a * 255, atol=0.51)


def test_float_image_in_byte_range_is_kept():
    a = np.array([[0.0, 2.0, 100.0, 255.0]], dtype=np.float32)
    np.testing.assert_array_equal(pixels(load_image(Image.fromarray(a)))[..., 0], a)


@pytest.mark.parametrize(
    "cmyk, rgb",
    [((0, 0, 0, 0), (255, 255, 255)), ((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)),
     ((0, 0, 0, 255), (0, 0, 0))],
)
def test_cmyk_is_converted(cmyk, rgb):
    out = pixels(load_image(solid(cmyk, mode="CMYK")))
    assert (out == rgb).all()


def test_cmyk_jpeg_file_is_converted(tmp_path):
    path = write(tmp_path, "print.jpg", encode(solid((0, 255, 255, 0), size=(16, 16), mode="CMYK"), "JPEG", quality=95))
    assert Image.open(path).mode == "CMYK"
    out = pixels(load_image(path))
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0), [255, 0, 0], atol=4)


# ---------------------------------------------------------------- numpy arrays


def test_uint8_arrays():
    rgb = np.asarray(noise(5, 3, seed=2))
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    gray = rgb[..., 0]
    for a in (gray, gray[..., None]):
        out = pixels(load_image(a))
        assert out.shape == (3, 5, 3)
        assert (out == gray[..., None]).all()


def test_rgba_array_is_composited_on_white():
    a = np.array([[[200, 10, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(pixels(load_image(a)), [[[255, 255, 255], [10, 20, 30]]])


def test_uint16_float_and_bool_arrays_are_scaled():
    np.testing.assert_allclose(pixels(load_image(SIXTEEN_BIT))[..., 0], SIXTEEN_BIT_AS_8, atol=0.51)
    f = np.array([[0.0, 0.5, 1.0]], dtype=np.float64)
    np.testing.assert_allclose(pixels(load_image(f))[..., 2], f * 255, atol=0.51)
    b = np.array([[True, False]])
    np.testing.assert_array_equal(pixels(load_image(b))[0], [[255, 255, 255], [0, 0, 0]])


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.full((2, 2, 3), 1.5), r"\[0, 1\]"),
        (np.full((2, 2, 3), -0.1), r"\[0, 1\]"),
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "NaN or infinite"),
        (np.zeros((2, 2, 3), dtype=np.int64), "unsupported array dtype"),
        (np.zeros((2, 2, 2), dtype=np.uint8), "not an image"),
        (np.zeros((5,), dtype=np.uint8), "not an image"),
        (np.zeros((1, 2, 2, 3), dtype=np.uint8), "not an image"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
    ],
)
def test_bad_arrays_are_refused(array, reason):
    with pytest.raises(ImageLoadError, match=reason) as err:
        load_image(array)
    assert "<array " in str(err.value)  # the source is described by shape and dtype


# ---------------------------------------------------------------- bad files


def test_zero_byte_file(tmp_path):
    path = write(tmp_path, "empty.png", b"")
    with pytest.raises(ImageLoadError, match="empty") as err:
        load_image(path)
    assert_names(err, path)


def test_zero_bytes_in_memory():
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")


def test_text_file_is_not_an_image(tmp_path):
    path = write(tmp_path, "notes.jpg", b"These are my holiday notes, not a photo.\n" * 20)
    with pytest.raises(ImageLoadError, match="not an image") as err:
        load_image(path)
    assert_names(err, path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_truncated_file(tmp_path, fmt):
    data = encode(noise(64, 48, seed=3), fmt)
    load_image(data)  # the whole file is fine
    path = write(tmp_path, f"half.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as err:
        load_image(path)
    assert_names(err, path)


def _bogus_huffman_table(jpeg: bytes) -> bytes:
    # Scrambled JPEG entropy data usually still decodes (to garbage: libjpeg only
    # warns), so break a structure it must trust: the code counts of the first DHT.
    data = bytearray(jpeg)
    at = data.index(b"\xff\xc4")
    data[at + 5:at + 21] = b"\xff" * 16
    return bytes(data)


def _scrambled_png_pixels(png: bytes) -> bytes:
    data = bytearray(png)
    start = data.index(b"IDAT") + 4 + 20
    for k in range(start, start + 40):  # inside the zlib stream; the chunk CRC no longer matches either
        data[k] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("fmt, damage", [("JPEG", _bogus_huffman_table), ("PNG", _scrambled_png_pixels)])
def test_corrupt_file(tmp_path, fmt, damage):
    data = encode(noise(64, 48, seed=4), fmt)
    load_image(data)  # the undamaged file is fine
    path = write(tmp_path, f"corrupt.{fmt.lower()}", damage(data))
    with pytest.raises(ImageLoadError, match="corrupt") as err:
        load_image(path)
    assert_names(err, path)


def test_truncated_file_refused_even_if_pillow_is_told_to_accept_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(noise(64, 48, seed=5), "JPEG")
    path = write(tmp_path, "half.jpg", data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "ghost.png"
    with pytest.raises(ImageLoadError, match="no such file") as err:
        load_image(path)
    assert_names(err, path)


def test_folder_is_not_an_image(tmp_path):
    folder = tmp_path / "photos.png"
    folder.mkdir()
    with pytest.raises(ImageLoadError, match="folder") as err:
        load_image(str(folder))
    assert_names(err, folder)


def test_errors_are_clip_interpret_errors(tmp_path):
    with pytest.raises(ClipInterpretError):
        load_image(tmp_path / "missing.png")


# ---------------------------------------------------------------- decompression bombs


def test_png_builder_makes_real_images():
    """The hand-made PNG helper is sound, so the bomb tests below test the guard."""
    rows = b"".join(b"\x00" + bytes([255, 0, 0] * 3) for _ in range(2))
    np.testing.assert_array_equal(pixels(load_image(png_claiming(3, 2, rows))), np.full((2, 3, 3), [255, 0, 0]))


@pytest.mark.parametrize("limit", [64 * 48 - 1, 64 * 48 // 2 - 1, 100])
def test_small_max_pixels_refuses_bigger_images(tmp_path, limit):
    # limit just below the size hits Pillow's warning zone; far below, its error zone
    path = write(tmp_path, "big.png", encode(noise(64, 48), "PNG"))
    with pytest.raises(ImageLoadError, match="decompression bomb") as err:
        load_image(path, max_pixels=limit)
    assert_names(err, path)


@pytest.mark.parametrize("limit", [64 * 48 - 1, 1000, 10])  # Pillow's warning zone, its error zone (> 2x), far
@pytest.mark.parametrize("as_pil", [False, True])
def test_bomb_error_quotes_the_one_limit_enforced_and_the_size(tmp_path, limit, as_pil):
    import re

    path = write(tmp_path, "big.png", encode(noise(64, 48), "PNG"))
    with pytest.raises(ImageLoadError) as err:
        load_image(Image.open(path) if as_pil else path, max_pixels=limit)
    message = str(err.value)
    assert f"{limit:,}" in message and "64x48" in message and "3,072" in message
    numbers = {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", message.replace(str(tmp_path), ""))}
    assert numbers == {64, 48, 3072, limit}  # no other limit (Pillow's error quotes twice ours)


def test_image_exactly_at_max_pixels_is_accepted(tmp_path):
    path = write(tmp_path, "fits.png", encode(noise(64, 48), "PNG"))
    assert load_image(path, max_pixels=64 * 48).size == (64, 48)


@pytest.mark.parametrize("side", [100_000, 10_000])  # 1e10 pixels: error zone; 1e8: warning zone
def test_png_header_claiming_a_huge_size_is_refused_by_default(tmp_path, side):
    assert side * side > MAX_PIXELS
    data = png_claiming(side, side)
    assert len(data) < 200  # the bomb itself is tiny
    path = write(tmp_path, "bomb.png", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a caller silencing warnings must not switch the guard off
        with pytest.raises(ImageLoadError, match="too many pixels") as err:
            load_image(path)
    assert_names(err, path)


def test_pillow_limit_is_restored_after_loading(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError):
        load_image(png_claiming(100_000, 100_000), max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == before
    load_image(encode(noise(4, 4), "PNG"), max_pixels=10**9)
    assert Image.MAX_IMAGE_PIXELS == before


def test_pil_image_over_max_pixels_is_refused_and_named(tmp_path):
    path = write(tmp_path, "opened.png", encode(noise(30, 20), "PNG"))
    with Image.open(path) as opened:
        with pytest.raises(ImageLoadError, match="too many pixels") as err:
            load_image(opened, max_pixels=599)
        assert str(path) in str(err.value)
        assert load_image(opened, max_pixels=600).size == (30, 20)


def test_zero_size_pil_image_is_refused():
    with pytest.raises(ImageLoadError, match="zero width or height"):
        load_image(Image.new("RGB", (0, 5)))


# ---------------------------------------------------------------- load_images


@pytest.fixture
def mixed_sources(tmp_path):
    red = write(tmp_path, "red.png", encode(solid((255, 0, 0)), "PNG"))
    jpeg = encode(noise(64, 48, seed=6), "JPEG")
    truncated = write(tmp_path, "cut.jpg", jpeg[: len(jpeg) // 2])
    blue = encode(solid((0, 0, 255)), "PNG")
    missing = tmp_path / "missing.png"
    green = solid((0, 255, 0))
    return [red, truncated, blue, missing, green]


def test_load_images_skip_keeps_good_ones_in_order(mixed_sources):
    images, kept, failures = load_images(mixed_sources, on_error="skip")
    assert kept == [0, 2, 4]
    assert [tuple(pixels(im)[0, 0]) for im in images] == [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    assert [f.index for f in failures] == [1, 3]
    assert all(isinstance(f, LoadFailure) for f in failures)
    assert failures[0].source == str(mixed_sources[1])
    assert "truncated" in failures[0].reason
    assert failures[1].source == str(mixed_sources[3])
    assert "no such file" in failures[1].reason


def test_load_images_raise_names_the_first_bad_file(mixed_sources):
    with pytest.raises(ImageLoadError) as err:
        load_images(mixed_sources, on_error="raise")
    assert_names(err, mixed_sources[1])


def test_load_images_raises_by_default(mixed_sources):
    with pytest.raises(ImageLoadError):
        load_images(mixed_sources)


def test_load_images_all_good_from_a_generator(tmp_path):
    colours = [(1, 2, 3), (40, 50, 60), (200, 100, 0)]
    paths = [write(tmp_path, f"{i}.png", encode(solid(c), "PNG")) for i, c in enumerate(colours)]
    images, kept, failures = load_images((p for p in paths), on_error="raise")
    assert kept == [0, 1, 2] and failures == []
    assert [tuple(pixels(im)[0, 0]) for im in images] == colours


def test_load_images_all_bad_with_skip(tmp_path):
    images, kept, failures = load_images([b"", tmp_path / "nope.png"], on_error="skip")
    assert images == [] and kept == []
    assert [f.index for f in failures] == [0, 1]


def test_load_images_passes_max_pixels_on():
    images, kept, failures = load_images([noise(10, 10), noise(3, 3)], on_error="skip", max_pixels=50)
    assert kept == [1]
    assert "too many pixels" in failures[0].reason


@pytest.mark.parametrize("bad", ["ignore", "warn", "", None])
def test_load_images_rejects_unknown_on_error(bad):
    with pytest.raises(ValueError, match="on_error"):
        load_images([noise(2, 2)], on_error=bad)


# ---------------------------------------------------------------- Preprocess


@pytest.fixture(scope="module")
def open_clip_transform():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.image_transform


COMPARISON_IMAGES = [
    ("noise 300x200", lambda: noise(300, 200, seed=10)),
    ("noise 173x411", lambda: noise(173, 411, seed=11)),
    ("noise 225x224", lambda: noise(225, 224, seed=12)),
    ("gradient 640x481", lambda: gradient(640, 481)),
    ("gradient 1000x333", lambda: gradient(1000, 333)),
    ("gradient 100x50 (upscaled)", lambda: gradient(100, 50)),
]

# Measured: Preprocess and open_clip's eval transform agree exactly (max and mean
# absolute difference 0.0) on all of these, since both resize with PIL. The
# bounds below leave room only for float rounding; a crop off by one pixel gives
# differences of ~0.01 on the gradients and ~1 on the noise, a swapped channel
# order or wrong mean/std far more.
MAX_DIFF = 1e-5
MEAN_DIFF = 1e-6


def _compare(ours: torch.Tensor, theirs: torch.Tensor):
    assert ours.shape == theirs.shape
    d = (ours - theirs).abs()
    assert float(d.max()) < MAX_DIFF
    assert float(d.mean()) < MEAN_DIFF


@pytest.mark.parametrize("name, make", COMPARISON_IMAGES, ids=[n for n, _ in COMPARISON_IMAGES])
def test_preprocess_matches_open_clip(open_clip_transform, name, make):
    image = make()
    ours = Preprocess((224, 224))(image)
    assert ours.shape == (3, 224, 224)
    assert ours.dtype == torch.float32
    assert ours.is_contiguous()
    _compare(ours, open_clip_transform(224, is_train=False)(image))


def test_preprocess_matches_open_clip_bilinear_and_custom_stats(open_clip_transform):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ours = Preprocess((64, 64), mean=mean, std=std, interpolation="bilinear")
    theirs = open_clip_transform(64, is_train=False, mean=mean, std=std, interpolation="bilinear")
    for image in (noise(150, 90, seed=13), gradient(77, 201)):
        _compare(ours(image), theirs(image))


@pytest.mark.parametrize("size", [(300, 200), (90, 210), (32, 48), (10, 7)])
def test_preprocess_non_square_target(open_clip_transform, size):
    image = gradient(*size)
    ours = Preprocess((48, 32))(image)
    assert ours.shape == (3, 48, 32)  # image_size is (height, width)
    assert ours.dtype == torch.float32
    _compare(ours, open_clip_transform((48, 32), is_train=False)(image))


def test_preprocess_normalises_each_channel_in_rgb_order():
    color = (200, 100, 50)
    out = Preprocess((8, 8))(solid(color, size=(12, 10)))
    expected = [(c / 255 - m) / s for c, m, s in zip(color, OPENAI_MEAN, OPENAI_STD)]
    for ch in range(3):
        torch.testing.assert_close(out[ch], torch.full((8, 8), expected[ch]), atol=1e-5, rtol=0)


def test_preprocess_converts_transparent_and_gray_inputs():
    white = [(1 - m) / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)]
    out = Preprocess((8, 8))(Image.new("RGBA", (10, 10), (0, 0, 0, 0)))
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(white), atol=1e-5, rtol=0)
    gray = Preprocess((8, 8), mean=(0.0,) * 3, std=(1.0,) * 3)(Image.new("L", (10, 10), 51))
    torch.testing.assert_close(gray, torch.full((3, 8, 8), 51 / 255), atol=1e-6, rtol=0)


def _xy_ramp(w: int, h: int) -> Image.Image:
    """Red = column, green = row (values 0..255 for a 256-pixel side)."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def test_crop_returns_the_centre_of_a_wide_image():
    crop = Preprocess((224, 224)).crop(_xy_ramp(256, 128))
    assert isinstance(crop, Image.Image)
    assert crop.size == (224, 224)
    a = pixels(crop)
    # the short side fills 224; the centre crop keeps the middle half of the width: columns 64..191
    assert abs(a[112, 0, 0] - 64) <= 1.5
    assert abs(a[112, -1, 0] - 191) <= 1.5
    assert abs(a[0, 112, 1] - 0) <= 1.5 and abs(a[-1, 112, 1] - 127) <= 1.5  # full height kept


def test_crop_returns_the_centre_of_a_tall_image():
    a = pixels(Preprocess((224, 224)).crop(_xy_ramp(128, 256)))
    assert a.shape == (224, 224, 3)
    assert abs(a[0, 112, 1] - 64) <= 1.5
    assert abs(a[-1, 112, 1] - 191) <= 1.5


def test_crop_non_square_target():
    crop = Preprocess((48, 32)).crop(_xy_ramp(256, 256))
    assert isinstance(crop, Image.Image)
    assert crop.size == (32, 48)  # PIL sizes are (width, height)
    a = pixels(crop)
    # 256x256 -> 48x48, then 32 of the 48 columns kept from column 8: pixel
    # centres 8.5 .. 39.5 of 48 map back to 256 * 8.5/48 .. 256 * 39.5/48
    assert abs(a[24, 0, 0] - 256 * 8.5 / 48) <= 2
    assert abs(a[24, -1, 0] - 256 * 39.5 / 48) <= 2
    assert a[0, 16, 1] <= 4 and a[-1, 16, 1] >= 251  # full height kept


def test_crop_leaves_an_image_of_the_target_size_alone():
    image = noise(32, 48, seed=14)
    np.testing.assert_array_equal(np.asarray(Preprocess((48, 32)).crop(image)), np.asarray(image))


def test_preprocess_batch_stacks_single_results():
    p = Preprocess((16, 16))
    images = [noise(20, 30, seed=15), gradient(40, 10)]
    batch = p.batch(images)
    assert batch.shape == (2, 3, 16, 16)
    for i, image in enumerate(images):
        torch.testing.assert_close(batch[i], p(image), atol=0, rtol=0)


def test_preprocess_unknown_interpolation_is_refused():
    with pytest.raises(ClipInterpretError, match="interpolation"):
        Preprocess((16, 16), interpolation="cubic-ish")(noise(20, 20))


def test_preprocess_to_dict_describes_it_fully():
    p = Preprocess((48, 32), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear")
    d = p.to_dict()
    assert d == {"image_size": (48, 32), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear"}
    assert Preprocess(**d) == p


@pytest.mark.parametrize("size", [(300, 200), (90, 210), (64, 64)])
def test_squash_preprocess_matches_open_clip(open_clip_transform, size):
    """SigLIP's preprocessing: resize to the input size whatever the aspect ratio, no crop."""
    image = gradient(*size)
    ours = Preprocess((48, 64), mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    assert ours.crop(image).size == (64, 48)
    _compare(ours(image), open_clip_transform((48, 64), is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3,
                                              resize_mode="squash")(image))
    on_device = ours.crop_tensor(torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()))
    assert on_device.shape == (3, 48, 64)
    assert (on_device.float() - torch.from_numpy(pixels(ours.crop(image)).transpose(2, 0, 1)).float()).abs().mean() < 2


def test_resize_mode_is_recorded_only_when_not_the_default():
    squash = Preprocess((16, 16), resize_mode="squash")
    assert squash.to_dict()["resize_mode"] == "squash" and Preprocess(**squash.to_dict()) == squash
    assert "resize_mode" not in Preprocess((16, 16)).to_dict()  # runs written before it existed stay valid
    with pytest.raises(ClipInterpretError, match="unknown resize mode 'longest'"):
        Preprocess((16, 16), resize_mode="longest")
