"""Photo-like JPEGs for the benchmarks: toy-world scenes upscaled to ~500x375 with grain, so that
decoding and resizing cost what they cost on real photos (no photo collection ships here)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np


def _photo(args) -> None:
    from PIL import Image

    from clip_interpret.toyworld import generate

    index, folder, size = args
    rng = np.random.default_rng(index)
    image = generate(index, seed=5).image.resize(size, Image.BICUBIC)
    grain = rng.integers(-14, 15, size=(size[1], size[0], 3))
    pixels = np.clip(np.asarray(image).astype(np.int16) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(Path(folder) / f"{index:06d}.jpg", quality=90)


def make_photos(folder: Path, n: int, size=(500, 375)) -> float:
    """Write ``n`` JPEGs into ``folder`` (in parallel); returns the seconds it took."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_photo, [(i, str(folder), size) for i in range(n)], chunksize=32)
    return time.perf_counter() - start
