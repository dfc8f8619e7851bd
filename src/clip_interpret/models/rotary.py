"""Rotary position embeddings (RoPE) on the queries and keys of a HookedViT.

A rotary tower (EVA02-CLIP, Perception Encoder) rotates each head's query and key
vectors of the patch tokens by angles fixed by the token's grid position; the
prefix tokens (class, registers) are left as they are. The rotation is a fixed
linear map per position, applied to q and k only: it changes the attention
pattern (which the decomposition records), never the value/output path.

The angles come from one table per tower, ``[n_rotated, 2 * head_dim]``: the
sines in the first half of the row, the cosines in the second (timm's "cat" rope,
``RotaryEmbeddingCat.get_embed()``), one row per rotated token, in stream order.
It is captured once, at conversion, for the tower's fixed grid (``table_from_timm``),
and kept as a buffer of the HookedViT, so a forward never recomputes it and any
choice of the grid's indexing ('ij' or 'xy'), offset, temperature or reference
shape the native tower made is carried by the numbers alone.

Two layouts of the pairs that rotate together (``ViTConfig.rope``):

* ``"interleaved"``: pairs (x0, x1), (x2, x3), ... (timm's default, EVA02, PE);
  ``rot(x) = [-x1, x0, -x3, x2, ...]``, the table's sines and cosines repeated per pair;
* ``"half"``: pairs (x_i, x_{i+d/2}) (``rope_rotate_half``);
  ``rot(x) = [-x_{d/2:}, x_{:d/2}]``.

In both, ``x' = x * cos + rot(x) * sin`` at each rotated position. ``ViTConfig.rope_prefix``
tokens at the start of the stream are not rotated (1: a class token; 0: none).
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "interleaved", "half")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown rotary mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def rotate_pairs(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``rot(x)`` over the last dimension: each rotating pair (a, b) -> (-b, a)."""
    if mode == "interleaved":
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([-odd, even], dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, table: torch.Tensor, mode: str, prefix: int) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, d] (queries or keys, stream positions 0..T-1) by ``table``
    [n_rotated, 2d]: positions ``prefix .. prefix + n_rotated - 1`` rotate, the first ``prefix``
    do not. ``x`` may hold fewer positions than the stream (the last block's CLS query alone):
    only the positions it holds are rotated. The rotation is computed in the table's precision
    (float32) and returned in ``x``'s dtype."""
    if mode == "none":
        return x
    n = x.shape[-2]
    if n <= prefix:
        return x
    rows = table[: n - prefix]
    sin, cos = rows.chunk(2, dim=-1)
    part = x[..., prefix:, :]
    rotated = (part * cos + rotate_pairs(part, mode) * sin).to(x.dtype)
    return rotated if prefix == 0 else torch.cat([x[..., :prefix, :], rotated], dim=-2)


def table_from_timm(rope: nn.Module, grid: tuple[int, int], head_dim: int) -> torch.Tensor:
    """The sin/cos table [gh * gw, 2 * head_dim] of a timm rotary module built for ``grid`` (a
    ``RotaryEmbeddingCat``: ``get_embed()``), in float32 on the CPU. Raises ``ValueError`` naming what
    differs when the module is of another kind or its table does not fit the grid and the heads."""
    kind = type(rope).__name__
    if kind != "RotaryEmbeddingCat" or not hasattr(rope, "get_embed"):
        raise ValueError(f"rotary embedding {kind} (only timm's 'cat' rope, RotaryEmbeddingCat)")
    with torch.no_grad():
        table = rope.get_embed() if getattr(rope, "feat_shape", None) is not None else rope.get_embed(shape=list(grid))
    n = grid[0] * grid[1]
    if tuple(table.shape) != (n, 2 * head_dim):
        raise ValueError(f"a rotary table of shape {list(table.shape)} (expected [{n}, {2 * head_dim}]: one row per "
                         "patch, sines and cosines of each head dimension)")
    return table.detach().float().cpu().clone()
