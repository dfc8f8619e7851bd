"""HookedViT: our own forward of a CLIP ViT image tower.

Weights from open_clip and Hugging Face are converted into this one module
(see ``convert.py``), so the decomposition is written once, against code we
own. The layout follows the CLIP ViT:

    z = ln_pre(patch_embed(x) ++ cls + pos)
    for each block:  z += ls1 * Attn(LN1(z));  z += ls2 * MLP(LN2(z))
    emb = LN_post(z[:, 0]) @ proj

Two forwards live here:

* ``forward`` — the fast plain forward. The last block only computes its CLS
  row (the only row that reaches the embedding).
* ``run_with_cache`` — an explicit, slow forward that records every named
  activation (``blocks.{l}.attn.hook_pattern``, ``blocks.{l}.hook_mlp_out``, ...)
  in the TransformerLens style; for inspection and as an independent reference
  in tests.

The decomposition forward lives in ``clip_interpret.decompose``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes the shape and arithmetic of a CLIP ViT image tower."""

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    width: int
    layers: int
    heads: int
    mlp_width: int
    output_dim: int
    act: str = "gelu"  # "gelu", "gelu_tanh" or "quick_gelu"
    ln_pre: bool = True
    layer_scale: bool = False
    ln_eps: float = 1e-5
    patch_bias: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict:
        return asdict(self)


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; expected gelu, gelu_tanh or quick_gelu")


class Block(nn.Module):
    """One residual block; parameters only, the arithmetic is in HookedViT."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        w = cfg.width
        self.ln1 = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.qkv = nn.Linear(w, 3 * w)  # rows: [W_Q; W_K; W_V], heads contiguous
        self.out = nn.Linear(w, w)  # columns grouped by head
        self.ln2 = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(w, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, w)
        if cfg.layer_scale:
            self.ls1 = nn.Parameter(torch.ones(w))
            self.ls2 = nn.Parameter(torch.ones(w))
        else:
            self.ls1 = self.ls2 = None


class HookedViT(nn.Module):
    """A CLIP ViT image tower whose forward is ours and whose activations have names."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.cls_embedding = nn.Parameter(torch.zeros(w))
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.n_tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps) if cfg.ln_pre else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.zeros(w, cfg.output_dim))
        self._act = activation(cfg.act)

    # ----------------------------------------------------------------- pieces
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> token stream [B, T, width] (CLS first)."""
        expected = tuple(self.cfg.image_size)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != expected:
            raise ValueError(
                f"expected preprocessed images of shape [B, 3, {expected[0]}, {expected[1]}], "
                f"got {list(pixels.shape)}; use model.preprocess or pass image files"
            )
        with torch.autocast(device_type=pixels.device.type, enabled=False):  # the stream's start, in float32
            x = self.patch_embed(pixels.to(self.proj.dtype)).flatten(2).transpose(1, 2)
        cls = self.cls_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1) + self.pos_embedding  # float32 from here (the stream)
        return self.norm(self.ln_pre, x) if self.ln_pre is not None else x.float()

    @staticmethod
    def norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm with float32 statistics, whatever the compute precision (autocast off)."""
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return ln(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, width] -> [B, H, T, head_dim]."""
        b, n, _ = t.shape
        return t.view(b, n, self.cfg.heads, self.cfg.head_dim).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, T, head_dim] -> [B, T, width]."""
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    def qkv(self, block: Block, h: torch.Tensor, cls_query_only: bool = False):
        """Queries, keys and values [B, H, T, head_dim]; only the CLS query if asked."""
        w = self.cfg.width
        if cls_query_only:
            q = F.linear(h[:, :1], block.qkv.weight[:w], block.qkv.bias[:w])
            kv = F.linear(h, block.qkv.weight[w:], block.qkv.bias[w:])
            k, v = kv.split(w, dim=-1)
        else:
            q, k, v = block.qkv(h).split(w, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def attn_out(self, block: Block, z: torch.Tensor) -> torch.Tensor:
        """Per-head attention results [B, H, T, d] -> residual update [B, T, width]."""
        out = block.out(self.merge_heads(z))
        return out * block.ls1 if block.ls1 is not None else out

    def mlp(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        out = block.fc2(self._act(block.fc1(self.norm(block.ln2, x))))
        return out * block.ls2 if block.ls2 is not None else out

    def project(self, resid_cls: torch.Tensor) -> torch.Tensor:
        """Final CLS residual [B, width] -> image embedding [B, output_dim] (not normalised), in float32."""
        with torch.autocast(device_type=resid_cls.device.type, enabled=False):
            return self.norm(self.ln_post, resid_cls) @ self.proj.float()

    # ---------------------------------------------------------------- forwards
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embedding [B, output_dim], not normalised (as native ``encode_image``)."""
        x = self.embed(pixels)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            only_cls = index == last
            q, k, v = self.qkv(block, self.norm(block.ln1, x), cls_query_only=only_cls)
            z = F.scaled_dot_product_attention(q, k, v)
            x = (x[:, :1] if only_cls else x) + self.attn_out(block, z)
            x = x + self.mlp(block, x)
        return self.project(x[:, 0])

    @torch.no_grad()
    def run_with_cache(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Explicit forward recording every named activation (slow; for inspection and tests).

        Names: ``hook_embed``; per block ``blocks.{l}.hook_resid_pre``,
        ``blocks.{l}.ln1.hook_normalized``, ``blocks.{l}.attn.hook_v`` [B, H, T, d],
        ``blocks.{l}.attn.hook_pattern`` [B, H, T, T], ``blocks.{l}.attn.hook_z``,
        ``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_mlp_out``,
        ``blocks.{l}.hook_resid_post``; then ``ln_post.hook_scale`` [B] and
        ``hook_image_embed``.
        """
        cache: dict[str, torch.Tensor] = {}
        x = self.embed(pixels)
        cache["hook_embed"] = x
        scale = self.cfg.head_dim ** -0.5
        for index, block in enumerate(self.blocks):
            name = f"blocks.{index}"
            cache[f"{name}.hook_resid_pre"] = x
            h = self.norm(block.ln1, x)
            cache[f"{name}.ln1.hook_normalized"] = h
            q, k, v = self.qkv(block, h)
            pattern = torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)
            z = pattern @ v
            cache[f"{name}.attn.hook_v"] = v
            cache[f"{name}.attn.hook_pattern"] = pattern
            cache[f"{name}.attn.hook_z"] = z
            attn = self.attn_out(block, z)
            cache[f"{name}.hook_attn_out"] = attn
            x = x + attn
            mlp = self.mlp(block, x)
            cache[f"{name}.hook_mlp_out"] = mlp
            x = x + mlp
            cache[f"{name}.hook_resid_post"] = x
        r = x[:, 0]
        cache["ln_post.hook_scale"] = torch.sqrt(r.var(dim=-1, unbiased=False) + self.cfg.ln_eps)
        emb = self.project(r)
        cache["hook_image_embed"] = emb
        return emb, cache
