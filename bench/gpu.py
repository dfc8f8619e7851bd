"""GPU check: exactness, throughput and memory on a CUDA machine, in one go (< 5 minutes on one H200).

    python bench/gpu.py [--quick] [--exif-only] [--out results.json]

0. EXIF orientation with JPEGs decoded on the device: a photo saved with each of the 8 EXIF
   orientations, read by the device path (tag read from the header on the host, nvJPEG on the
   GPU, apply_orientation there) against Pillow on the CPU (exif_transpose): same shape, grey
   levels apart at full size; then the pipeline's crops, decode=device with 2 reader workers
   started after CUDA is initialised (a fork server) against decode=pil with none. The script
   exits with status 1 if a check fails (after printing and writing its figures).
1. Exactness on the device: total() of a decomposition against open_clip's own fp32
   encode_image (relative error), in fp32, bf16 and fp16 compute precision (ViT-B-16).
2. Throughput, batch 256, random weights: decompose (last 4 layers) vs native
   encode_image, fp32 and bf16 (native under autocast), ViT-B-16 and ViT-L-14.
3. index of a folder of >= 3,000 JPEG photos (~500x375, generated here) with bf16
   compute, the JPEGs decoded on the GPU (decode=device) and by CPU workers
   (decode=torch), against the native bf16 forward on preprocessed tensors.
4. Spatial decomposition of all layers, ViT-L-14: time vs a native forward and the
   peak GPU memory it adds, for 1 and 16 images.

Without a GPU it runs the same steps on the CPU with small sizes (--quick is implied),
to check the script itself. Prints one table per step and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from _photos import make_photos  # bench/_photos.py


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, iters: int) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _native(arch: str, device):
    from clip_interpret.models.loader import create_open_clip

    model = create_open_clip(f"open_clip:{arch}", arch).eval().to(device)
    return model


def exactness(device, arch: str) -> list[dict]:
    from clip_interpret import decompose, load_model

    native = _native(arch, device)
    size = native.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    pixels = torch.randn(8, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = native.encode_image(pixels).float()
    reference = (reference / reference.norm(dim=-1, keepdim=True)).cpu()
    rows = []
    for precision in ("fp32", "bf16", "fp16"):
        model = load_model(native, device=device, precision=precision)
        d = decompose(model, pixels)
        error = ((d.total() - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
        self_error = (d.total() - d.embedding).abs().max().item()
        rows.append({"arch": arch, "precision": precision, "relative_error_vs_native_fp32": error,
                     "total_minus_embedding_max_abs": self_error})
    return rows


def throughput(device, arch: str, batch: int, iters: int) -> list[dict]:
    from clip_interpret import load_model
    from clip_interpret.decompose import decompose_pixels
    from clip_interpret.device import compute

    native = _native(arch, device)
    model = load_model(native, device=device)
    size = model.vit.cfg.image_size
    pixels = torch.randn(batch, 3, *size, device=device)
    rows = []
    for precision in ("fp32", "bf16"):
        def run_native():
            with torch.no_grad(), compute(device, precision):
                native.encode_image(pixels)

        t_native = _timed(run_native, device, iters)
        t_ours = _timed(lambda: decompose_pixels(model.vit, pixels, precision=precision), device, iters)
        rows.append({"arch": arch, "precision": precision, "batch": batch, "native_img_s": batch / t_native,
                     "decompose_img_s": batch / t_ours, "ratio": t_native / t_ours})
    del native, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def index_throughput(device, arch: str, folder: Path, batch: int, workers: int) -> list[dict]:
    from clip_interpret import load_model
    from clip_interpret.device import compute
    from clip_interpret.runstore import index_images

    native = _native(arch, device)
    model = load_model(native, device=device, precision="bf16")
    size = model.vit.cfg.image_size
    pixels = torch.randn(batch, 3, *size, device=device)

    def forward():
        with torch.no_grad(), compute(device, "bf16"):
            native.encode_image(pixels)

    native_rate = batch / _timed(forward, device, 5)
    rows = []
    for decode in ("device", "torch") if device.type == "cuda" else ("torch",):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            run = index_images(model, str(folder), Path(tmp) / "run", batch_size=batch, workers=workers,
                               decode=decode, progress=False)
            elapsed = time.perf_counter() - start
        rows.append({"arch": arch, "decode": decode, "workers": workers, "images": len(run),
                     "index_img_s": len(run) / elapsed, "native_bf16_img_s": native_rate,
                     "share_of_native": len(run) / elapsed / native_rate})
    del native, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def spatial(device, arch: str, counts, iters: int) -> list[dict]:
    from clip_interpret import load_model
    from clip_interpret.decompose import decompose_pixels

    native = _native(arch, device)
    model = load_model(native, device=device)
    size = model.vit.cfg.image_size
    rows = []
    for count in counts:
        pixels = torch.randn(count, 3, *size, device=device)

        def forward():
            with torch.no_grad():
                native.encode_image(pixels)

        t_native = _timed(forward, device, iters)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        t_spatial = _timed(lambda: decompose_pixels(model.vit, pixels, layers="all", spatial=True), device, iters)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None
        rows.append({"arch": arch, "images": count, "native_s": t_native, "spatial_all_layers_s": t_spatial,
                     "ratio": t_spatial / t_native, "peak_added_gib": peak})
    del native, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def exif_orientation(device, folder: Path) -> list[dict]:
    """Step 0 (see the module doc): one row per orientation, with ``ok``."""
    import numpy as np
    from PIL import Image

    from clip_interpret.images import Preprocess, apply_orientation, jpeg_orientation, load_image
    from clip_interpret.pipeline import ListSource, _decode_jpeg, pixel_batches, reader_start_method

    torch.zeros(1, device=device)  # CUDA initialised, as once a model is on the GPU
    make_photos(folder / "base", 1)
    stored = Image.open(next((folder / "base").glob("*.jpg"))).convert("RGB")  # 500x375: turns show
    paths = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        paths.append(folder / f"orientation{orientation}.jpg")
        stored.save(paths[-1], quality=90, exif=exif)
    preprocess = Preprocess((224, 224))
    source = ListSource([str(p) for p in paths])
    method = reader_start_method()
    reference = next(pixel_batches(source, preprocess, [list(range(8))], "cpu", workers=0, decode="pil"))
    ours = next(pixel_batches(source, preprocess, [list(range(8))], device, workers=2, decode="device"))
    std = torch.tensor(preprocess.std).view(3, 1, 1) * 255
    rows = []
    for k, path in enumerate(paths):
        data = path.read_bytes()
        expected = torch.from_numpy(np.array(load_image(data))).permute(2, 0, 1)
        decoded = _decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device)
        turned = apply_orientation(decoded, jpeg_orientation(data)).cpu()
        same_shape = turned.shape == expected.shape
        diff = (turned.int() - expected.int()).abs().float() if same_shape else None
        crop_diff = ((ours.pixels[ours.indices.index(k)].cpu() - reference.pixels[k]).abs() * std
                     if k in ours.indices else None)
        row = {"orientation": k + 1, "tag_read": jpeg_orientation(data), "shape": "x".join(map(str, turned.shape)),
               "same_shape": same_shape, "full_max": diff.max().item() if diff is not None else None,
               "full_mean": diff.mean().item() if diff is not None else None,
               "crop_max": crop_diff.max().item() if crop_diff is not None else None,
               "crop_mean": crop_diff.mean().item() if crop_diff is not None else None, "readers": method}
        # a missed turn or flip moves whole regions: tens of grey levels on average; two JPEG decoders
        # (nvJPEG, libjpeg-turbo) and two resamplers differ by about one at most on average
        row["ok"] = (row["tag_read"] == k + 1 and same_shape and row["full_mean"] < 2.0
                     and crop_diff is not None and row["crop_mean"] < 2.0)
        rows.append(row)
    return rows


def _table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    keys = list(rows[0])
    print("  " + " | ".join(keys))
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        print("  " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (implied without a GPU)")
    parser.add_argument("--out", default=None, help="JSON file for the figures (default $OUT/gpu.json if $OUT is set)")
    parser.add_argument("--photos", type=int, default=3000)
    parser.add_argument("--exif-only", action="store_true", help="step 0 only (EXIF orientation on the device)")
    args = parser.parse_args()

    from clip_interpret.device import cores, resolve_device

    device = resolve_device("auto")
    quick = args.quick or device.type != "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, {cores()} CPU cores, quick={quick}")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    figures = {"device": name, "torch": torch.__version__, "cores": cores(), "quick": quick}
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        figures["exif"] = exif_orientation(device, Path(tmp))
    _table("0. EXIF orientation, JPEGs decoded on the device vs Pillow (grey levels)", figures["exif"])
    failed = [row["orientation"] for row in figures["exif"] if not row["ok"]]
    if args.exif_only:
        _finish(figures, started, args.out, failed)
        return

    big = [] if quick else ["ViT-L-14"]
    base = "test-vit-tiny" if quick else "ViT-B-16"
    batch = 16 if quick else 256
    figures["exactness"] = exactness(device, base)
    _table("1. exactness: total() vs native fp32 encode_image", figures["exactness"])
    figures["throughput"] = [row for arch in [base, *big] for row in throughput(device, arch, batch, 3 if quick else 10)]
    _table(f"2. decompose vs native, batch {batch}", figures["throughput"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        n = 200 if quick else args.photos
        figures["photos_generated_s"] = make_photos(folder, n)
        figures["index"] = [row for arch in [base, *big]
                            for row in index_throughput(device, arch, folder, batch, cores())]
    _table(f"3. index of {n} JPEG photos (500x375), bf16, {cores()} workers", figures["index"])
    figures["spatial"] = spatial(device, "test-vit-tiny" if quick else "ViT-L-14", (1, 16), 2 if quick else 5)
    _table("4. spatial decomposition of all layers vs one native forward", figures["spatial"])
    _finish(figures, started, args.out, failed)


def _finish(figures: dict, started: float, out: str | None, failed: list[int]) -> None:
    figures["seconds"] = time.perf_counter() - started
    print(f"\ndone in {figures['seconds']:.0f} s")
    out = out or (os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(figures, indent=1))
        print(f"wrote {out}")
    if failed:
        print(f"FAILED: EXIF orientation on the device differs from Pillow for orientation(s) {failed} (step 0)")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
