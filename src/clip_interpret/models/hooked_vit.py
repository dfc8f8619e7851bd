"""HookedViT: our own forward of a CLIP ViT image tower.

Weights from open_clip and Hugging Face are converted into this one module
(see ``convert.py``), so the decomposition is written once, against code we
own. The layout follows the CLIP ViT:

    z = ln_pre(patch_embed(x) ++ cls + pos)
    for each block:  z += ls1 * Attn(LN1(z));  z += ls2 * MLP(LN2(z))
    emb = LN_post(z[:, 0]) @ proj

One block loop (``run``) serves every forward, as TransformerLens owns its
transformer: each activation has a name (``blocks.{l}.attn.hook_z``, ...; see
``hook_names()``) where hooks can read or replace it.

* ``forward``: the plain forward; the last block computes only its CLS row (the
  only row that reaches the embedding) and attention goes through PyTorch's fused
  kernel.
* ``run_with_cache(pixels, names_filter)`` and ``run_with_hooks(pixels, fwd_hooks)``:
  the same loop with callbacks; a full attention pattern is materialised only where
  it is hooked or cached.
* the decomposition (``clip_interpret.decompose``) asks the loop for the explicit
  CLS attention row of the analysed layers and maps what it leaves (``Trace``) into
  the joint space.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipInterpretError


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
        self._names = [tuple(f"blocks.{layer}.{point}" for point in BLOCK_POINTS) for layer in range(cfg.layers)]

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

    def project(self, resid_cls: torch.Tensor) -> torch.Tensor:
        """Final CLS residual [B, width] -> image embedding [B, output_dim] (not normalised), in float32."""
        with torch.autocast(device_type=resid_cls.device.type, enabled=False):
            return self.norm(self.ln_post, resid_cls) @ self.proj.float()

    # ---------------------------------------------------------------- forwards
    def hook_names(self) -> list[str]:
        """Every hook point, in the order a forward meets them."""
        names = ["hook_embed"]
        for layer in range(self.cfg.layers):
            names += [f"blocks.{layer}.{point}" for point in BLOCK_POINTS]
        return names + list(FINAL_POINTS)

    def run(self, pixels: torch.Tensor, points: "HookPoints | None" = None, cls_rows=(), token_z: bool = False,
            cls_only_last: bool = True) -> "Trace":
        """The one block loop. Every forward goes through it: the plain forward, the hooked and
        cached forwards, and the decomposition.

        ``points``: hooks and cache of named activations (``HookPoints``). ``cls_rows``: layers
        whose CLS attention row is computed explicitly and whose heads' CLS results are kept
        (``Trace.head_z``; per token with ``token_z``): what the decomposition needs.
        ``cls_only_last``: the last block computes only its CLS row, the only one that reaches
        the embedding (off when a hook or the cache asks for a last-block activation).
        """
        cfg = self.cfg
        cls_rows = frozenset(cls_rows)
        scale = cfg.head_dim ** -0.5
        last = cfg.layers - 1
        hook = points if points is not None else _no_hook
        x = hook("hook_embed", self.embed(pixels))
        trace = Trace(resid_cls0=x[:, 0])
        cls_only_last = cls_only_last and not (points is not None and points.wants_block(last))
        for index, block in enumerate(self.blocks):
            names = self._names[index]
            only_cls = cls_only_last and index == last
            x = hook(names[0], x)  # hook_resid_pre
            h = hook(names[1], self.norm(block.ln1, x))  # ln1.hook_normalized
            q, k, v = self.qkv(block, h, cls_query_only=only_cls)
            q, k, v = hook(names[2], q), hook(names[3], k), hook(names[4], v)
            explicit = index in cls_rows
            if points is not None and points.wants(names[5]):  # the full pattern, asked for
                pattern = hook(names[5], torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1).to(v.dtype))
                z = pattern @ v
                cls_pattern = pattern[:, :, :1]
            elif explicit:  # only the CLS query row, explicitly: its weights split the CLS result by token
                cls_pattern = torch.softmax((q[:, :, :1] * scale) @ k.transpose(-1, -2), dim=-1).to(v.dtype)
                z_cls = cls_pattern @ v
                z = z_cls if only_cls else torch.cat([z_cls, F.scaled_dot_product_attention(q[:, :, 1:], k, v)],
                                                     dim=2)
            else:
                z = F.scaled_dot_product_attention(q, k, v)
            hooked_z = hook(names[6], z)
            if explicit:
                if token_z and hooked_z is not z:
                    raise ClipInterpretError(f"a hook on {names[6]} changes the heads' results: they no longer "
                                             "split by token; decompose that layer without spatial=True")
                trace.head_z[index] = cls_pattern.transpose(-1, -2) * v if token_z else hooked_z[:, :, 0]
            z = hooked_z
            attn = self.attn_out(block, z)
            if explicit and z.dtype != torch.float32:
                # the CLS row's output projection in float32, as the decomposition maps its pieces: the
                # pieces then sum to the embedding this forward computes, in any precision
                with torch.autocast(device_type=z.device.type, enabled=False):
                    attn = torch.cat([self.attn_out(block, z[:, :, :1].float()), attn[:, 1:].float()], dim=1)
            attn = hook(names[7], attn)  # hook_attn_out
            trace.attn_cls.append(attn[:, 0])
            x = hook(names[8], (x[:, :1] if only_cls else x) + attn)  # hook_resid_mid
            post = hook(names[10], self._act(block.fc1(hook(names[9], self.norm(block.ln2, x)))))  # mlp.hook_post
            mlp = block.fc2(post)
            mlp = hook(names[11], mlp * block.ls2 if block.ls2 is not None else mlp)  # hook_mlp_out
            trace.mlp_cls.append(mlp[:, 0])
            x = hook(names[12], x + mlp)  # hook_resid_post
        trace.final_cls = x[:, 0]
        return trace

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embedding [B, output_dim], not normalised (as native ``encode_image``)."""
        return self.project(self.run(pixels).final_cls)

    def _finish(self, trace: "Trace", points: "HookPoints") -> torch.Tensor:
        r = trace.final_cls
        if points.wants("ln_post.hook_scale"):
            with torch.autocast(device_type=r.device.type, enabled=False):
                points("ln_post.hook_scale", torch.sqrt(r.float().var(dim=-1, unbiased=False) + self.cfg.ln_eps))
        return points("hook_image_embed", self.project(r))

    @torch.no_grad()
    def run_with_cache(self, pixels: torch.Tensor, names_filter=None, fwd_hooks=()):
        """The forward, keeping named activations: ``(embedding, ActivationCache)``.

        ``names_filter``: None (every hook point), a name, a list of names, or a function
        name -> bool. ``fwd_hooks`` run as in ``run_with_hooks`` (the cache holds what they
        returned). Names are listed by ``hook_names()``: ``hook_embed``; per block
        ``blocks.{l}.hook_resid_pre``, ``ln1.hook_normalized``, ``attn.hook_q/k/v``
        [B, H, T, d], ``attn.hook_pattern`` [B, H, T, T], ``attn.hook_z`` [B, H, T, d],
        ``hook_attn_out``, ``hook_resid_mid``, ``ln2.hook_normalized``, ``mlp.hook_post``,
        ``hook_mlp_out``, ``hook_resid_post``; then ``ln_post.hook_scale`` [B] and
        ``hook_image_embed``.
        """
        points = HookPoints(self, fwd_hooks, names_filter, cache=ActivationCache())
        return self._finish(self.run(pixels, points), points), points.cache

    @torch.no_grad()
    def run_with_hooks(self, pixels: torch.Tensor, fwd_hooks) -> torch.Tensor:
        """The forward with hooks: ``fwd_hooks`` is a list of ``(name, fn)``; ``fn(activation, name)``
        returns a replacement tensor (or None to leave it). Returns the embedding (not normalised)."""
        points = HookPoints(self, fwd_hooks)
        return self._finish(self.run(pixels, points), points)


BLOCK_POINTS = ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ln2.hook_normalized",
                "mlp.hook_post", "hook_mlp_out", "hook_resid_post")
FINAL_POINTS = ("ln_post.hook_scale", "hook_image_embed")


def _no_hook(name: str, value: torch.Tensor) -> torch.Tensor:
    return value


@dataclass
class Trace:
    """What one pass of the loop leaves for the decomposition (CLS rows, [B, width] each)."""

    resid_cls0: torch.Tensor
    attn_cls: list = field(default_factory=list)  # per layer
    mlp_cls: list = field(default_factory=list)  # per layer
    head_z: dict = field(default_factory=dict)  # layer -> [B, H, d] (or [B, H, T, d] per token)
    final_cls: torch.Tensor | None = None


class ActivationCache(dict):
    """Named activations of one forward. ``cache["pattern", 3]`` is short for
    ``cache["blocks.3.attn.hook_pattern"]`` (any block point's last part, as in TransformerLens)."""

    def __getitem__(self, key):
        if isinstance(key, tuple):
            short, layer = key
            matches = [p for p in BLOCK_POINTS if p.split(".")[-1] in (short, f"hook_{short}")]
            if len(matches) != 1:
                raise KeyError(f"{short!r} names {len(matches)} hook points; use the full name")
            key = f"blocks.{int(layer)}.{matches[0]}"
        if not dict.__contains__(self, key):
            raise KeyError(f"{key!r} is not in this cache (cached: {len(self)} names; pass it in names_filter)")
        return dict.__getitem__(self, key)


class HookPoints:
    """The hooks and the cache of one pass: ``points(name, value)`` runs the hooks on a named
    activation (each may return a replacement) and keeps the result when the cache wants it."""

    def __init__(self, vit: HookedViT, fwd_hooks=(), names_filter=None, cache: dict | None = None):
        known = vit.hook_names()
        self.hooks: dict[str, list] = {}
        for item in fwd_hooks:
            name, fn = item
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                raise ClipInterpretError(f"unknown hook point {name!r}" + (f"; did you mean {close[0]!r}?" if close
                                         else "; HookedViT.hook_names() lists them"))
            self.hooks.setdefault(name, []).append(fn)
        self.cache = cache
        if cache is None:
            self.keep = lambda name: False
        elif names_filter is None:
            self.keep = lambda name: True
        elif callable(names_filter):
            self.keep = names_filter
        else:
            chosen = {names_filter} if isinstance(names_filter, str) else set(names_filter)
            unknown = sorted(chosen - set(known))
            if unknown:
                raise ClipInterpretError(f"unknown hook point {unknown[0]!r} in names_filter; "
                                         "HookedViT.hook_names() lists them")
            self.keep = chosen.__contains__
        self._wanted = {name for name in known if name in self.hooks or self.keep(name)}

    def wants(self, name: str) -> bool:
        return name in self._wanted

    def wants_block(self, layer: int) -> bool:
        prefix = f"blocks.{layer}."
        return any(name.startswith(prefix) for name in self._wanted)

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor:
        for fn in self.hooks.get(name, ()):
            out = fn(value, name)
            if out is not None:
                if out.shape != value.shape:
                    raise ClipInterpretError(f"the hook on {name} returned shape {list(out.shape)}; the "
                                             f"activation has shape {list(value.shape)}")
                value = out
        if self.cache is not None and self.keep(name):
            self.cache[name] = value
        return value
