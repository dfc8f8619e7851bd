"""Benchmark: indexing a collection vs plain decompose, bytes per image, peak memory (CPU).

1. Throughput: the bundled toy model over N toy-world PNG files, `index_images`
   (folder source, fp16 shards) vs `decompose` on the same file list.
2. Bytes stored per image (fp16 and fp32).
3. Peak memory (kernel high-water mark) of `index_images` over 5,000 and 50,000
   toy images, each in a fresh process: flat memory means the two are close.

    python bench/index.py [--n 2000] [--big 50000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_child(n: int) -> dict:
    from clip_interpret import load_model
    from clip_interpret.runstore import index_images

    model = load_model("toy")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = index_images(model, f"toyworld:{n}:1", Path(tmp) / "run", progress=False)
        elapsed = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (Path(tmp) / "run").rglob("*") if p.is_file())
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return {"n": len(run), "peak_mb": peak / 1024, "seconds": elapsed, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--big", type=int, default=50_000)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_peak_child(args.child)))
        return

    import torch

    from clip_interpret import decompose, load_model
    from clip_interpret.runstore import index_images
    from clip_interpret.toyworld import export

    model = load_model("toy")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export(tmp / "images", args.n, seed=1, masks=False, progress=False)
        paths = sorted(str(p) for p in (tmp / "images" / "images").glob("*.png"))
        decompose(model, paths[:64])  # warm-up
        start = time.perf_counter()
        for b in range(0, len(paths), 64):
            decompose(model, paths[b:b + 64], batch_size=64)
        t_plain = time.perf_counter() - start
        start = time.perf_counter()
        run16 = index_images(model, str(tmp / "images" / "images"), tmp / "run16", batch_size=64, progress=False)
        t_index = time.perf_counter() - start
        run32 = index_images(model, str(tmp / "images" / "images"), tmp / "run32", dtype="fp32", progress=False)
        bytes16 = sum(p.stat().st_size for p in (tmp / "run16" / "shards").glob("*.npy")) / len(run16)
        bytes32 = sum(p.stat().st_size for p in (tmp / "run32" / "shards").glob("*.npy")) / len(run32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; toy model "
          f"({model.vit.cfg.layers} layers x {model.vit.cfg.heads} heads, D={model.vit.cfg.output_dim})")
    print(f"1. {args.n} PNG files: decompose {args.n / t_plain:.0f} img/s, index {args.n / t_index:.0f} img/s, "
          f"ratio {t_plain / t_index:.2f}x (target >= 0.9)")
    print(f"2. bytes stored per image: {bytes16:.0f} (fp16), {bytes32:.0f} (fp32); "
          f"layout {run16.manifest['layout']}")
    print("3. peak memory of index_images (fresh process each):")
    for n in (args.big // 10, args.big):
        done = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True,
                              check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"   {r['n']:>7} toy images: peak {r['peak_mb']:.0f} MB, {r['seconds']:.0f} s "
              f"({r['n'] / r['seconds']:.0f} img/s), run size {r['bytes'] / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
