"""HookedViT: our own forward of a CLIP ViT image tower.

Weights from open_clip and Hugging Face are converted into this one module
(see ``convert.py``), so the decomposition is written once, against code we
own. The layout follows the CLIP ViT:

    z = ln_pre(patch_embed(x) ++ cls + pos)
    for each block:  z += ls1 * Attn(LN1(z));  z += ls2 * MLP(LN2(z))
    emb = LN_post(z[:, 0]) @ proj [+ b_proj]                        (pool "cls")
    emb = LN_post(mean_{i>=1} z[:, i]) @ proj [+ b_proj]            (pool "avg")

("avg": CLIPA's average pooling over the patch tokens, the CLS token left out, with
LN_post applied after pooling, to the pooled vector; CLIPA has no ln_pre),

EVA02's pieces, where the config has them: rotary embeddings on q and k (``rope``,
``models/rotary.py``), a LayerNorm over the concatenated heads before the output
projection (``attn_ln``), a gated MLP (``glu``, SwiGLU) with a LayerNorm over its
hidden units (``mlp_ln``), and post-norm blocks (``post_norm``:
``z += LN1(Attn(z)); z += LN2(MLP(z))``, no pre-norms),

or, for towers that pool by attention (SigLIP's MAP head; no CLS token, the
final LayerNorm applied to every token):

    n = LN_post(z)                          every token
    y = Attn_pool(query, n)                 one learned query, its own heads
    emb = (y + MLP(LN(y))) [@ proj]                                 (pool "map")

or, for CoCa's multi-query attention pooler (open_clip's ``attentional_pool``: a CLS token, LN_k on every
token, learned queries of the pooler's own width, LN_post on each query's output, the embedding its first
query's row; only that query is computed, the others feed CoCa's caption decoder):

    n = LN_post(z)                          every token (open_clip's ln_k of the pooler)
    y = Attn_pool(LN_q(query_0), n)         keys and values from width to the pooler's width
    emb = LN(y) @ proj                                              (pool "attn-pool")

One block loop (``run``) serves every forward, as TransformerLens owns its
transformer: each activation has a name (``blocks.{l}.attn.hook_z``, ...; see
``hook_names()``) where hooks can read or replace it. The model only computes:
nothing here knows about the decomposition.

* ``forward``: the plain forward; attention goes through PyTorch's fused kernel
  and, in a CLS-pooled tower, the last block computes only its CLS row (the only
  row that reaches the embedding; an average- or attention-pooled tower reads every row).
* ``run_with_cache(pixels, names_filter)`` and ``run_with_hooks(pixels, fwd_hooks)``:
  the same loop with callbacks; a full attention pattern is materialised only where
  it is hooked or cached, the CLS query's row alone (``attn.hook_cls_pattern``)
  where that is.
* each ``Block`` knows its attention output map (``out_weight()``, ``out_bias()``:
  the output projection with its LayerScale; ``attn_output()``: the forward's
  arithmetic of it), which the forward, the decomposition and the interventions share.
* the decomposition (``clip_interpret.decompose``) reads what it needs through
  hook points (``HookPoints.add``: hooks that need only the rows reaching the
  embedding, so the last block is still cut short) and maps it into the joint space.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipInterpretError
from .rotary import apply_rotary, check_mode


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
    class_token: bool = True
    pool: str = "cls"  # "cls": the CLS row; "avg": the mean of the patch rows, LN_post after it (CLIPA);
    #                    "map": an attention-pooling head over every token (SigLIP); "attn-pool": CoCa's
    #                    multi-query attentional pooler, its first query, LayerNorm after it
    pool_heads: int = 0  # the pooling head's attention heads ("map", "attn-pool")
    pool_mlp_width: int = 0  # its MLP's hidden width ("map")
    pool_width: int = 0  # the multi-query pooler's width, its queries' and outputs' ("attn-pool": CoCa's output_dim)
    proj: bool = True  # a projection to the joint space after pooling (SigLIP towers have none)
    proj_bias: bool = False  # a bias after the projection (EVA01-CLIP's timm head, a Linear with bias)
    rope: str = "none"  # rotary embeddings on q and k (models/rotary.py): "none", "interleaved" or "half" pairs
    rope_prefix: int = 0  # tokens at the stream's start that rotary embeddings leave alone (1: a class token)
    glu: bool = False  # a gated MLP (SwiGLU with act "silu"): fc1 rows [gate; value], hidden act(gate) * value
    mlp_ln: bool = False  # a LayerNorm over the MLP's hidden units before fc2 (EVA02's sub-LN, scale_mlp)
    attn_ln: bool = False  # a LayerNorm over the concatenated heads before the output projection (scale_attn_inner)
    post_norm: bool = False  # post-norm blocks: z += LN1(Attn(z)); z += LN2(MLP(z)) (EVA02-E's use_post_norm)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_tokens(self) -> int:
        gh, gw = self.grid
        return gh * gw + int(self.class_token)

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
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown activation {name!r}; expected gelu, gelu_tanh, quick_gelu or silu")


def scaled_norm(ln: nn.LayerNorm, x: torch.Tensor, scale_hook=None) -> torch.Tensor:
    """LayerNorm with float32 statistics (autocast off), float32 out. ``scale_hook``: the per-token scale
    ``sqrt(var + eps)`` [...] goes through it (which may replace it: a frozen scale) and the norm is written
    out; without it, PyTorch's fused LayerNorm."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if scale_hook is None:
            return F.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        x = x.float()
        centred = x - x.mean(dim=-1, keepdim=True)
        scale = scale_hook(torch.sqrt(centred.pow(2).mean(dim=-1) + ln.eps))
        return centred / scale[..., None] * ln.weight + ln.bias


class Block(nn.Module):
    """One residual block: its parameters and its attention output map (the loop is in HookedViT)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        w = cfg.width
        ln = functools.partial(nn.LayerNorm, eps=cfg.ln_eps)
        self.ln1 = ln(w) if not cfg.post_norm else None  # pre-norms (none in a post-norm block)
        self.qkv = nn.Linear(w, 3 * w)  # rows: [W_Q; W_K; W_V], heads contiguous
        self.ln_inner = ln(w) if cfg.attn_ln else None  # over the concatenated heads, before ``out``
        self.out = nn.Linear(w, w)  # columns grouped by head
        self.ln1_post = ln(w) if cfg.post_norm else None  # post-norms: on each branch's output
        self.ln2 = ln(w) if not cfg.post_norm else None
        self.fc1 = nn.Linear(w, cfg.mlp_width * (2 if cfg.glu else 1))  # gated: rows [gate; value]
        self.mlp_ln = ln(cfg.mlp_width) if cfg.mlp_ln else None  # over the hidden units, before fc2
        self.fc2 = nn.Linear(cfg.mlp_width, w)
        self.ln2_post = ln(w) if cfg.post_norm else None
        self.glu = cfg.glu
        if cfg.layer_scale:
            self.ls1 = nn.Parameter(torch.ones(w))
            self.ls2 = nn.Parameter(torch.ones(w))
        else:
            self.ls1 = self.ls2 = None

    def _scale1(self, t: torch.Tensor) -> torch.Tensor:
        """The attention branch's LayerScale over the output dimension (the last), when the tower has one."""
        return t * self.ls1 if self.ls1 is not None else t

    @property
    def linear_output(self) -> bool:
        """Whether the attention output map is affine in the heads' results (no LayerNorm over the heads,
        no post-norm): then ``attn_output(change, bias=False)`` is the update's change."""
        return self.ln_inner is None and self.ln1_post is None

    def out_weight(self) -> torch.Tensor:
        """The attention output map's weight, the projection with its LayerScale: [width_out, width_in],
        its input columns grouped by head (``ls1 * W_O``). With a LayerNorm over the heads (scale_attn_inner)
        or a post-norm, their per-token scales frozen, the map is linear: ``ls1 * diag(g1) C W_O diag(g_in) C``
        (C: centring, g_in, g1: the inner and the post-norm gains), to be divided by those scales
        (``attn_output``'s ``scale_hooks`` read them; docs/decomposition.md)."""
        weight = self.out.weight
        if self.ln_inner is not None:
            weight = weight * self.ln_inner.weight
            weight = weight - weight.mean(dim=1, keepdim=True)
        if self.ln1_post is not None:
            weight = self.ln1_post.weight[:, None] * (weight - weight.mean(dim=0, keepdim=True))
        return weight * self.ls1[:, None] if self.ls1 is not None else weight

    def out_bias(self) -> torch.Tensor:
        """The attention output map's bias with its LayerScale (``ls1 * b_O``), [width]. With a LayerNorm
        over the heads, its bias joins: ``W_O beta_in + b_O``; with a post-norm, that is centred and scaled by
        its gain (to be divided by its frozen scale), and its own bias is ``out_post_bias()``."""
        bias = self.out.bias
        if self.ln_inner is not None:
            bias = self.out.weight @ self.ln_inner.bias + bias
        if self.ln1_post is not None:
            bias = self.ln1_post.weight * (bias - bias.mean())
        return self._scale1(bias)

    def out_post_bias(self) -> torch.Tensor | None:
        """The post-norm's bias on the attention branch with its LayerScale, not divided by any scale;
        None without a post-norm."""
        return self._scale1(self.ln1_post.bias) if self.ln1_post is not None else None

    def attn_output(self, merged: torch.Tensor, bias: bool = True, scale_hooks: dict | None = None) -> torch.Tensor:
        """The heads' merged results [..., width] -> the update added to the stream, as the forward
        computes it: ``ls1 * (W_O z + b_O)`` (without ``b_O`` when not ``bias``: a change of z, for a
        ``linear_output`` map only); with a LayerNorm over the heads and a post-norm,
        ``ls1 * LN1_post(W_O LN_in(z) + b_O)``. ``scale_hooks``: {"inner": fn, "post": fn}, each given
        that norm's per-token scale (and may replace it; ``scaled_norm``)."""
        if self.linear_output:
            return self._scale1(F.linear(merged, self.out.weight, self.out.bias if bias else None))
        if not bias:
            raise ValueError("this attention output map is not linear in the heads' results (a LayerNorm over "
                             "the heads or a post-norm): take the difference of two outputs")
        hooks = scale_hooks or {}
        if self.ln_inner is not None:
            merged = scaled_norm(self.ln_inner, merged, hooks.get("inner"))
        out = F.linear(merged, self.out.weight, self.out.bias)
        if self.ln1_post is not None:
            out = scaled_norm(self.ln1_post, out, hooks.get("post"))
        return self._scale1(out)

    def mlp_output(self, h: torch.Tensor, act, post_hook=None) -> torch.Tensor:
        """The MLP branch's update from its input ``h`` [..., width] (the pre-normed stream, or the stream
        itself in a post-norm block): ``fc2(act(fc1 h))`` or, gated, ``fc2(act(gate) * value)``; the sub-LN
        before fc2 and the post-norm after it where the tower has them, LayerScale last. ``post_hook``:
        applied to the hidden units before the sub-LN (``mlp.hook_post``)."""
        pre = self.fc1(h)
        if self.glu:
            gate, value = pre.chunk(2, dim=-1)
            hidden = act(gate) * value
        else:
            hidden = act(pre)
        if post_hook is not None:
            hidden = post_hook(hidden)
        if self.mlp_ln is not None:
            hidden = scaled_norm(self.mlp_ln, hidden).to(hidden.dtype)
        out = self.fc2(hidden)
        if self.ln2_post is not None:
            out = scaled_norm(self.ln2_post, out)
        return out * self.ls2 if self.ls2 is not None else out


class AttentionPool(nn.Module):
    """The attention-pooling (MAP) head's parameters: one learned query attends to every token of
    the LayerNormed stream with its own heads; then ``y + MLP(LN(y))``. The arithmetic is in HookedViT."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        w = cfg.width
        self.query = nn.Parameter(torch.zeros(w))  # the learned latent, before its projection
        self.q = nn.Linear(w, w)
        self.kv = nn.Linear(w, 2 * w)  # rows: [W_K; W_V], heads contiguous
        self.out = nn.Linear(w, w)
        self.ln = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(w, cfg.pool_mlp_width)
        self.fc2 = nn.Linear(cfg.pool_mlp_width, w)


class MultiQueryPool(nn.Module):
    """CoCa's attentional pooler, the query the embedding reads (its first): ``LN_q(query)`` attends with the
    pooler's heads to every token of the LayerNormed stream (keys and values map width -> pool_width), its
    output projection, then the LayerNorm over the pooled row (open_clip's ``ln_post``). The arithmetic is in
    HookedViT."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        e = cfg.pool_width
        self.query = nn.Parameter(torch.zeros(e))  # the first learned query, before LN_q
        self.ln_q = nn.LayerNorm(e, eps=cfg.ln_eps)
        self.q = nn.Linear(e, e)
        self.kv = nn.Linear(cfg.width, 2 * e)  # rows: [W_K; W_V], heads contiguous
        self.out = nn.Linear(e, e)
        self.ln = nn.LayerNorm(e, eps=cfg.ln_eps)  # after pooling


class HookedViT(nn.Module):
    """A CLIP ViT image tower whose forward is ours and whose activations have names."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.pool not in POOLS:
            raise ValueError(f"unknown pooling {cfg.pool!r}; expected one of {', '.join(POOLS)}")
        if cfg.pool in ("cls", "avg") and not cfg.class_token:
            raise ValueError(f"{cfg.pool!r} pooling needs a class token")
        if check_mode(cfg.rope) != "none" and cfg.n_tokens - cfg.rope_prefix != cfg.grid[0] * cfg.grid[1]:
            raise ValueError(f"rope_prefix={cfg.rope_prefix} leaves {cfg.n_tokens - cfg.rope_prefix} tokens to rotate; "
                             f"the grid has {cfg.grid[0] * cfg.grid[1]} patches")
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.cls_embedding = nn.Parameter(torch.zeros(w)) if cfg.class_token else None
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.n_tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps) if cfg.ln_pre else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.pool = AttentionPool(cfg) if cfg.pool == "map" else MultiQueryPool(cfg) if cfg.pool == "attn-pool" \
            else None
        self.proj = nn.Parameter(torch.zeros(cfg.pool_width if cfg.pool == "attn-pool" else w, cfg.output_dim)) \
            if cfg.proj else None
        self.proj_bias = nn.Parameter(torch.zeros(cfg.output_dim)) if cfg.proj and cfg.proj_bias else None
        if cfg.rope != "none":  # the rotary sin/cos table [patches, 2 * head_dim], captured at conversion
            self.register_buffer("rope_table", torch.zeros(cfg.grid[0] * cfg.grid[1], 2 * cfg.head_dim))
        else:
            self.rope_table = None
        self._act = activation(cfg.act)
        self._names = [{point: f"blocks.{layer}.{point}" for point in BLOCK_POINTS} for layer in range(cfg.layers)]

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    # ----------------------------------------------------------------- pieces
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> token stream [B, T, width] (CLS first, when the tower has one)."""
        expected = tuple(self.cfg.image_size)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != expected:
            raise ValueError(
                f"expected preprocessed images of shape [B, 3, {expected[0]}, {expected[1]}], "
                f"got {list(pixels.shape)}; use model.preprocess or pass image files"
            )
        with torch.autocast(device_type=pixels.device.type, enabled=False):  # the stream's start, in float32
            x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if self.cls_embedding is not None:
            x = torch.cat([self.cls_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embedding  # float32 from here (the stream)
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

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        """Queries or keys [B, H, T, d] with the tower's rotary embeddings applied (``models/rotary.py``):
        the positions after the first ``rope_prefix`` rotate; ``t`` unchanged in a tower without them."""
        if self.rope_table is None:
            return t
        return apply_rotary(t, self.rope_table, self.cfg.rope, self.cfg.rope_prefix)

    def attn_out(self, block: Block, z: torch.Tensor) -> torch.Tensor:
        """Per-head attention results [B, H, T, d] -> residual update [B, T, width] (``Block.attn_output``)."""
        return block.attn_output(self.merge_heads(z))

    def head(self, x: torch.Tensor, points: "HookPoints | None" = None) -> torch.Tensor:
        """The final stream [B, rows, width] -> image embedding [B, output_dim] (not normalised), in
        float32: LN_post of the CLS row (or of the mean of the patch rows, pool "avg") and the projection,
        or the attention-pooling head (SigLIP's MAP head, or CoCa's pooler, its LayerNorm and the projection). A CLS-pooled tower reads only row 0, so ``x`` may hold that row alone."""
        hook = points if points is not None else _no_hook
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.cfg.pool == "cls":
                x = x[:, 0]
            elif self.cfg.pool == "avg":
                x = x[:, 1:].mean(dim=1)  # the patch tokens; the CLS token is left out
            if points is not None and points.wants("ln_post.hook_scale"):
                hook("ln_post.hook_scale", torch.sqrt(x.var(dim=-1, unbiased=False) + self.cfg.ln_eps))
            if self.pool is None:
                out = self.norm(self.ln_post, x)
            elif self.cfg.pool == "attn-pool":
                out = self._multi_query_pool(x, points)
            else:
                out = self._attention_pool(x, hook)
            if self.proj is None:
                return out
            out = out @ self.proj.float()
            return out + self.proj_bias.float() if self.proj_bias is not None else out

    def _attention_pool(self, x: torch.Tensor, hook) -> torch.Tensor:
        """The final stream [B, T, width] -> the MAP head's output ``y + MLP(LN(y))`` [B, width]:
        one learned query attends to LN_post of every token."""
        cfg, pool = self.cfg, self.pool
        b, n, w = x.shape
        d = w // cfg.pool_heads
        normed = self.norm(self.ln_post, x)
        hooked_normed = hook("ln_post.hook_normalized", normed)
        query = pool.q(pool.query).view(1, cfg.pool_heads, 1, d)
        k, v = (t.view(b, n, cfg.pool_heads, d).transpose(1, 2) for t in pool.kv(hooked_normed).split(w, dim=-1))
        k, hooked_v = hook("pool.hook_k", k), hook("pool.hook_v", v)
        pattern = hook("pool.hook_pattern", torch.softmax((query * d ** -0.5) @ k.transpose(-1, -2), dim=-1))
        z = pattern @ hooked_v  # [B, Hp, 1, d]
        hooked_z = hook("pool.hook_z", z)
        y = hook("pool.hook_attn_out", pool.out(hooked_z.transpose(1, 2).reshape(b, w)))
        post = hook("pool.mlp.hook_post", self._act(pool.fc1(hook("pool.ln.hook_normalized", self.norm(pool.ln, y)))))
        mlp = hook("pool.hook_mlp_out", pool.fc2(post))
        return y + mlp

    def _multi_query_pool(self, x: torch.Tensor, points: "HookPoints | None") -> torch.Tensor:
        """The final stream [B, T, width] -> CoCa's pooled row ``LN(y)`` [B, pool_width] (before the
        projection): the first learned query, after LN_q, attends to LN_post of every token."""
        cfg, pool = self.cfg, self.pool
        hook = points if points is not None else _no_hook
        b, n, _ = x.shape
        e, heads = cfg.pool_width, cfg.pool_heads
        d = e // heads
        hooked_normed = hook("ln_post.hook_normalized", self.norm(self.ln_post, x))
        query = pool.q(self.norm(pool.ln_q, pool.query)).view(1, heads, 1, d)
        k, v = (t.view(b, n, heads, d).transpose(1, 2) for t in pool.kv(hooked_normed).split(e, dim=-1))
        k, hooked_v = hook("pool.hook_k", k), hook("pool.hook_v", v)
        pattern = hook("pool.hook_pattern", torch.softmax((query * d ** -0.5) @ k.transpose(-1, -2), dim=-1))
        z = hook("pool.hook_z", pattern @ hooked_v)  # [B, Hp, 1, d]
        y = hook("pool.hook_attn_out", pool.out(z.transpose(1, 2).reshape(b, e)))
        if points is not None and points.wants("pool.ln.hook_scale"):
            hook("pool.ln.hook_scale", torch.sqrt(y.var(dim=-1, unbiased=False) + pool.ln.eps))
        return hook("pool.ln.hook_normalized", self.norm(pool.ln, y))

    # ---------------------------------------------------------------- forwards
    def hook_names(self) -> list[str]:
        """Every hook point, in the order a forward meets them."""
        names = ["hook_embed"]
        cfg = self.cfg
        absent = ({CLS_PATTERN} if not cfg.class_token else set()) | \
            ({Q_ROT, K_ROT} if self.rope_table is None else set()) | \
            ({INNER_SCALE} if not cfg.attn_ln else set()) | \
            ({POST_SCALE} if not cfg.post_norm else {"ln1.hook_normalized", "ln2.hook_normalized"})
        points = [p for p in BLOCK_POINTS if p not in absent]
        for layer in range(self.cfg.layers):
            names += [f"blocks.{layer}.{point}" for point in points]
        if self.cfg.pool == "attn-pool":
            return names + list(MULTI_QUERY_POINTS)
        return names + list(FINAL_POINTS if self.pool is None else POOL_POINTS)

    def run(self, pixels: torch.Tensor, points: "HookPoints | None" = None) -> torch.Tensor:
        """The one block loop: pixels -> image embedding [B, output_dim] (not normalised). Every
        forward goes through it: the plain forward, the hooked and cached forwards, and the
        decomposition, which reads what it needs through ``points``.

        ``points``: hooks and cache of named activations (``HookPoints``). Attention runs in
        PyTorch's fused kernel, except in a layer whose full pattern is hooked or cached (then
        computed explicitly) or whose CLS query row alone is (``attn.hook_cls_pattern``: that row
        explicitly, the other rows fused). In a CLS-pooled tower the last block computes only its
        CLS row, the only one that reaches the embedding, unless ``points`` asks for a last-block
        activation at every row (``fwd_hooks`` or the cache; ``HookPoints.add`` hooks do not).
        """
        cfg = self.cfg
        scale = cfg.head_dim ** -0.5
        last = cfg.layers - 1
        hook = points if points is not None else _no_hook
        wants = points.wants if points is not None else _wants_nothing
        x = hook("hook_embed", self.embed(pixels))
        cut_last = self.cfg.pool == "cls" and not (points is not None and points.wants_every_row(last))
        for index, block in enumerate(self.blocks):
            names = self._names[index]
            only_cls = cut_last and index == last
            x = hook(names["hook_resid_pre"], x)
            h = hook(names["ln1.hook_normalized"], self.norm(block.ln1, x)) if block.ln1 is not None else x
            q, k, v = self.qkv(block, h, cls_query_only=only_cls)
            q, k, v = hook(names["attn.hook_q"], q), hook(names["attn.hook_k"], k), hook(names["attn.hook_v"], v)
            if self.rope_table is not None:  # rotary: only the pattern changes, not the values
                q, k = hook(names[Q_ROT], self.rotate(q)), hook(names[K_ROT], self.rotate(k))
            if wants(names["attn.hook_pattern"]):  # the full pattern, asked for
                pattern = hook(names["attn.hook_pattern"],
                               torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1).to(v.dtype))
                if wants(names[CLS_PATTERN]):
                    row = pattern[:, :, :1]
                    hooked_row = hook(names[CLS_PATTERN], row)
                    if hooked_row is not row:
                        pattern = torch.cat([hooked_row, pattern[:, :, 1:]], dim=2)
                z = pattern @ v
            elif wants(names[CLS_PATTERN]):  # only the CLS query's row, explicitly; the other rows fused
                cls_pattern = hook(names[CLS_PATTERN],
                                   torch.softmax((q[:, :, :1] * scale) @ k.transpose(-1, -2), dim=-1).to(v.dtype))
                z_cls = cls_pattern @ v
                z = z_cls if only_cls else torch.cat([z_cls, F.scaled_dot_product_attention(q[:, :, 1:], k, v)],
                                                     dim=2)
            else:
                z = F.scaled_dot_product_attention(q, k, v)
            z = hook(names["attn.hook_z"], z)
            if block.linear_output:
                attn = block.attn_output(self.merge_heads(z))
            else:
                attn = block.attn_output(self.merge_heads(z), scale_hooks=self._scale_hooks(names, wants, hook))
            attn = hook(names["hook_attn_out"], attn)
            x = hook(names["hook_resid_mid"], (x[:, :1] if only_cls else x) + attn)
            if block.ln2 is not None and not block.glu and block.mlp_ln is None:  # the plain MLP
                post = hook(names["mlp.hook_post"], self._act(block.fc1(hook(names["ln2.hook_normalized"],
                                                                             self.norm(block.ln2, x)))))
                mlp = block.fc2(post)
                mlp = mlp * block.ls2 if block.ls2 is not None else mlp
            else:
                h2 = hook(names["ln2.hook_normalized"], self.norm(block.ln2, x)) if block.ln2 is not None else x
                mlp = block.mlp_output(h2, self._act, functools.partial(hook, names["mlp.hook_post"]))
            mlp = hook(names["hook_mlp_out"], mlp)
            x = hook(names["hook_resid_post"], x + mlp)
        return hook("hook_image_embed", self.head(x, points))

    @staticmethod
    def _scale_hooks(names: dict, wants, hook) -> dict:
        """The per-token scales of the norms inside an attention output map (``Block.attn_output``) through
        their hook points, where hooks or the cache want them (else the fused LayerNorm runs)."""
        return {kind: functools.partial(hook, names[point]) for kind, point in (("inner", INNER_SCALE),
                                                                                 ("post", POST_SCALE))
                if wants(names[point])}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embedding [B, output_dim], not normalised (as native ``encode_image``)."""
        return self.run(pixels)

    @torch.no_grad()
    def run_with_cache(self, pixels: torch.Tensor, names_filter=None, fwd_hooks=()):
        """The forward, keeping named activations: ``(embedding, ActivationCache)``.

        ``names_filter``: None (every hook point), a name, a list of names, or a function
        name -> bool. ``fwd_hooks`` run as in ``run_with_hooks`` (the cache holds what they
        returned). Names are listed by ``hook_names()``: ``hook_embed``; per block
        ``blocks.{l}.hook_resid_pre``, ``ln1.hook_normalized``, ``attn.hook_q/k/v``
        [B, H, T, d], ``attn.hook_q_rot``/``attn.hook_k_rot`` (q and k after the rotary embeddings,
        which the pattern is computed from; rotary towers only), ``attn.hook_pattern`` [B, H, T, T], ``attn.hook_cls_pattern`` [B, H, 1, T]
        (the CLS query's row; towers with a CLS token), ``attn.hook_z`` [B, H, T, d],
        ``hook_attn_out``, ``hook_resid_mid``, ``ln2.hook_normalized``, ``mlp.hook_post``,
        ``hook_mlp_out``, ``hook_resid_post``; then ``ln_post.hook_scale`` [B] and
        ``hook_image_embed``. An attention-pooled tower has, after the blocks,
        ``ln_post.hook_scale`` [B, T], ``ln_post.hook_normalized``, ``pool.hook_k/v``
        [B, Hp, T, d], ``pool.hook_pattern`` [B, Hp, 1, T], ``pool.hook_z`` [B, Hp, 1, d],
        ``pool.hook_attn_out``, ``pool.ln.hook_normalized``, ``pool.mlp.hook_post``,
        ``pool.hook_mlp_out`` and ``hook_image_embed``; a multi-query pooled one (CoCa), after the blocks,
        ``ln_post.hook_scale`` [B, T], ``ln_post.hook_normalized``, ``pool.hook_k/v`` [B, Hp, T, d],
        ``pool.hook_pattern`` [B, Hp, 1, T] (the first query's), ``pool.hook_z``, ``pool.hook_attn_out``
        [B, pool_width], ``pool.ln.hook_scale`` [B], ``pool.ln.hook_normalized`` and ``hook_image_embed``.
        """
        points = HookPoints(self, fwd_hooks, names_filter, cache=ActivationCache())
        return self.run(pixels, points), points.cache

    @torch.no_grad()
    def run_with_hooks(self, pixels: torch.Tensor, fwd_hooks) -> torch.Tensor:
        """The forward with hooks: ``fwd_hooks`` is a list of ``(name, fn)``; ``fn(activation, name)``
        returns a replacement tensor (or None to leave it). Returns the embedding (not normalised)."""
        return self.run(pixels, HookPoints(self, fwd_hooks))


POOLS = ("cls", "avg", "map", "attn-pool")
CLS_PATTERN = "attn.hook_cls_pattern"  # the CLS query's attention row (towers with a CLS token)
Q_ROT, K_ROT = "attn.hook_q_rot", "attn.hook_k_rot"  # q and k after the rotary embeddings (rotary towers)
INNER_SCALE = "attn.ln.hook_scale"  # the per-token scale of the LayerNorm over the heads (scale_attn_inner)
POST_SCALE = "ln1_post.hook_scale"  # the per-token scale of the attention branch's post-norm (post-norm blocks)
BLOCK_POINTS = ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", Q_ROT, K_ROT,
                "attn.hook_pattern", CLS_PATTERN, "attn.hook_z", INNER_SCALE, POST_SCALE, "hook_attn_out",
                "hook_resid_mid",
                "ln2.hook_normalized", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")
FINAL_POINTS = ("ln_post.hook_scale", "hook_image_embed")
POOL_POINTS = ("ln_post.hook_scale", "ln_post.hook_normalized", "pool.hook_k", "pool.hook_v", "pool.hook_pattern",
               "pool.hook_z", "pool.hook_attn_out", "pool.ln.hook_normalized", "pool.mlp.hook_post",
               "pool.hook_mlp_out", "hook_image_embed")
MULTI_QUERY_POINTS = ("ln_post.hook_scale", "ln_post.hook_normalized", "pool.hook_k", "pool.hook_v",
                      "pool.hook_pattern",
                      "pool.hook_z", "pool.hook_attn_out", "pool.ln.hook_scale", "pool.ln.hook_normalized",
                      "hook_image_embed")


def _no_hook(name: str, value: torch.Tensor) -> torch.Tensor:
    return value


def _wants_nothing(name: str) -> bool:
    return False


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
    activation (each may return a replacement) and keeps the result when the cache wants it.

    ``add(name, fn)`` adds a hook that needs only the rows reaching the embedding (a reader such
    as the decomposition): it does not stop the last block of a CLS-pooled tower from computing
    its CLS row alone, as ``fwd_hooks`` and the cache on a last-block activation do."""

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
        self._known = known
        self._wanted = {name for name in known if name in self.hooks or self.keep(name)}
        self._every_row = set(self._wanted)  # what fwd_hooks and the cache ask for: every row they compute

    def add(self, name: str, fn, first: bool = False) -> None:
        """One more hook on ``name``, after those already there (before them when ``first``), that
        needs only the rows reaching the embedding (see the class doc)."""
        if name not in self._known:
            raise ClipInterpretError(f"unknown hook point {name!r}; HookedViT.hook_names() lists them")
        hooks = self.hooks.setdefault(name, [])
        hooks.insert(0, fn) if first else hooks.append(fn)
        self._wanted.add(name)

    def wants(self, name: str) -> bool:
        return name in self._wanted

    def wants_every_row(self, layer: int) -> bool:
        """Whether ``fwd_hooks`` or the cache ask for an activation of block ``layer`` (at every row)."""
        prefix = f"blocks.{layer}."
        return any(name.startswith(prefix) for name in self._every_row)

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
