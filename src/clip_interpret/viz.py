"""Heat-map rendering (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_heatmap(path: str | Path, image: Image.Image, heat: np.ndarray, title: str = "",
                 vmax: float | None = None) -> Path:
    """Write a PNG: the image beside the heat map overlaid on it.

    ``heat`` is [H, W] at the image's size; the colour scale is symmetric around
    zero (red: the region raises the similarity, blue: it lowers it).
    """
    plt = pyplot()
    heat = np.asarray(heat, dtype=np.float32)
    limit = float(vmax if vmax is not None else max(np.abs(heat).max(), 1e-12))
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.8), dpi=100)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    shown = axes[1].imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.6)
    axes[1].set_title("contribution to similarity", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if not hasattr(path, "write"):  # a path; a file-like object (e.g. BytesIO) is written as is
        path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
