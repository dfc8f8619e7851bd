"""Benchmark: decomposition cost against open_clip's native encode_image (CPU, random weights).

1. Throughput of a token-summed decomposition of the last 4 layers vs native
   ``encode_image`` at batch 32, for ViT-B-32 and ViT-B-16 (target ratio >= 1.0),
   and ViT-B-16-SigLIP through its attention-pooling head (target ratio >= 0.9).
2. A spatial decomposition of ALL layers for one image: time vs one native forward
   (target <= 2x) and peak memory added during the call (target < 1.5 GB for ViT-L-14).
   Each model is measured in a fresh subprocess; peak memory is read from the
   kernel's high-water mark (VmHWM), reset just before the call.

Prints figures measured in this one run; it is not a test.

    python bench/decompose.py [--iters 3] [--batch 32] [--arch ViT-B-16-SigLIP ...] [--only throughput|spatial]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _build(arch: str):
    """The native open_clip model (random weights) and our HookedViT of its image tower."""
    import open_clip

    from clip_interpret.models.convert import from_open_clip

    torch.manual_seed(0)
    native = open_clip.create_model(arch, pretrained=None).eval()
    return native, from_open_clip(native.visual)


def _time(fn, iters: int) -> float:
    """Best of ``iters`` wall times (seconds), after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def throughput(arch: str, batch: int, iters: int) -> dict:
    from clip_interpret.decompose import decompose_pixels

    native, vit = _build(arch)
    pixels = torch.randn(batch, 3, *vit.cfg.image_size)
    calls = {
        "native": lambda: native.encode_image(pixels),
        "forward": lambda: vit(pixels),
        "decompose": lambda: decompose_pixels(vit, pixels),
    }
    best = dict.fromkeys(calls, float("inf"))
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            fn()
        for _ in range(iters):  # interleaved, best of each: load on a shared machine hits all three alike
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    t_native, t_forward, t_decomp = best["native"], best["forward"], best["decompose"]
    return {
        "arch": arch, "batch": batch,
        "native_img_s": batch / t_native, "hooked_forward_img_s": batch / t_forward,
        "decompose_img_s": batch / t_decomp, "ratio": t_native / t_decomp,
    }


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def spatial_child(arch: str, iters: int) -> dict:
    """Runs in a subprocess: time and peak memory of a spatial all-layer decomposition."""
    import gc

    from clip_interpret.decompose import decompose_pixels

    native, vit = _build(arch)
    native.visual = None  # keep only what each measured call needs beside it
    gc.collect()
    pixels = torch.randn(1, 3, *vit.cfg.image_size)
    with torch.no_grad():
        t_forward = _time(lambda: vit(pixels), iters)
        # the native forward, rebuilt from the same weights for timing only
        import open_clip

        reference = open_clip.create_model(arch, pretrained=None).visual.eval()
        t_native = _time(functools.partial(reference, pixels), iters)
        del reference
        gc.collect()
        t_spatial = _time(lambda: decompose_pixels(vit, pixels, layers="all", spatial=True), iters)
        gc.collect()
        before = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak-RSS high-water mark
        result = decompose_pixels(vit, pixels, layers="all", spatial=True)
        peak = _rss_kb("VmHWM")
    return {
        "arch": arch, "native_forward_s": t_native, "hooked_forward_s": t_forward, "spatial_all_layers_s": t_spatial,
        "ratio_to_native": t_spatial / t_native, "peak_added_mb": (peak - before) / 1024,
        "process_peak_mb": peak / 1024, "result_mb": result.heads.numel() * result.heads.element_size() / 2**20,
        "heads_shape": list(result.heads.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", choices=("throughput", "spatial"), default=None,
                        help="run one part (e.g. --only throughput with PYTHONPATH=OLD/src to measure older code)")
    parser.add_argument("--arch", nargs="+", default=["ViT-B-32", "ViT-B-16", "ViT-B-16-SigLIP"],
                        help="architectures of part 1 (default: ViT-B-32 ViT-B-16 ViT-B-16-SigLIP)")
    parser.add_argument("--no-spatial", action="store_true", help="part 1 only (as --only throughput)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child:
        print(json.dumps(spatial_child(args.child, args.iters)))
        return

    import clip_interpret

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, random weights, "
          f"code {Path(clip_interpret.__file__).parent}, load average {os.getloadavg()[0]:.2f}\n")
    if args.only != "spatial":
        throughput_table(args)
    if args.only != "throughput" and not args.no_spatial:
        spatial_table(args)
    print("\nratio in 1: native time / decompose time (>= 1.0 means decomposing is no slower than encoding);"
          "\nratio in 2: spatial time / native forward time; peak added: memory the call adds on top of"
          "\nthe loaded model (kernel high-water mark), process peak: the whole process including weights.")


def throughput_table(args) -> None:
    print(f"1. token-summed decomposition (last 4 layers) vs native encode_image, batch {args.batch}")
    print(f"{'arch':<16} {'native img/s':>13} {'HookedViT img/s':>16} {'decompose img/s':>16} {'ratio':>7}")
    for arch in args.arch:
        r = throughput(arch, args.batch, args.iters)
        print(f"{arch:<16} {r['native_img_s']:>13.1f} {r['hooked_forward_img_s']:>16.1f} "
              f"{r['decompose_img_s']:>16.1f} {r['ratio']:>6.2f}x")
    if args.no_spatial:
        return


def spatial_table(args) -> None:
    print("\n2. spatial decomposition of ALL layers, one image (fresh process per model)")
    print(f"{'arch':<10} {'native fwd s':>12} {'spatial s':>10} {'ratio':>7} {'peak added MB':>14} "
          f"{'process peak MB':>16} {'result MB':>10}")
    for arch in ("ViT-B-16", "ViT-L-14"):
        done = subprocess.run([sys.executable, __file__, "--child", arch, "--iters", str(args.iters)],
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{arch:<10} {r['native_forward_s']:>12.3f} {r['spatial_all_layers_s']:>10.3f} "
              f"{r['ratio_to_native']:>6.2f}x {r['peak_added_mb']:>14.0f} {r['process_peak_mb']:>16.0f} "
              f"{r['result_mb']:>10.0f}")


if __name__ == "__main__":
    main()
