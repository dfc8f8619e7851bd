"""Benchmark: TextSpan for 48 heads against the published algorithm (CPU).

Setting of the issue: 48 heads, 10,000 images, 3,500 texts, D = 512, rank 80, m = 20.
Head contributions are synthetic (a few text directions plus noise, seeded); the
published algorithm is run on one head (it costs the same for every head) and
extrapolated to 48, and its picks are compared with ours on that head.

    python bench/textspan.py [--heads 48] [--images 10000] [--texts 3500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_textspan import published  # noqa: E402  (the plain published steps)

from clip_interpret.textspan import textspan  # noqa: E402


def head_data(seed: int, k: int, texts: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = texts.shape[1]
    chosen = texts[rng.choice(len(texts), 12, replace=False)]
    weights = rng.normal(size=(k, 12)) * np.linspace(3, 0.3, 12)
    # plus noise with a decaying spectrum, as real heads have: a flat noise floor would make the
    # top-rank subspace (and so any implementation's later picks) numerically arbitrary
    noise = (rng.normal(size=(k, d)) * (0.3 * 0.985 ** np.arange(d))) @ np.linalg.qr(rng.normal(size=(d, d)))[0]
    return (weights @ chosen + noise + rng.normal(size=d)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--texts", type=int, default=3_500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rank", type=int, default=80)
    parser.add_argument("--m", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    texts = rng.normal(size=(args.texts, args.dim))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    names = [str(i) for i in range(args.texts)]

    data = [head_data(h, args.images, texts) for h in range(args.heads)]
    start = time.perf_counter()
    results = [textspan(d, texts, names, m=args.m, rank=args.rank) for d in data]
    ours = time.perf_counter() - start

    start = time.perf_counter()
    picks, _ = published(data[0], texts, args.m, args.rank)
    one_published = time.perf_counter() - start
    print(f"TextSpan, {args.heads} heads x {args.images} images, {args.texts} texts, D={args.dim}, "
          f"rank {args.rank}, m={args.m}")
    print(f"  ours, all {args.heads} heads:        {ours:8.2f} s  ({ours / args.heads * 1000:.0f} ms/head)")
    print(f"  published steps, one head:       {one_published:8.2f} s")
    print(f"  published, {args.heads} heads (x{args.heads}):  {one_published * args.heads:8.1f} s")
    print(f"  speed-up: {one_published * args.heads / ours:.0f}x; same picks on head 0: {picks == results[0].indices}")


if __name__ == "__main__":
    main()
