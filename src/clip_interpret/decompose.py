"""Exact decomposition of a CLIP image embedding into layers, heads and tokens.

The CLS row of the final residual stream is a sum of pieces,

    r = r0 + sum_l (a_l + m_l),
    a_l = sum_h sum_i A[l,h][0,i] * ls1 * W_O[l,h] (W_V[l,h] LN1(z_i) + b_V[l,h]) + ls1 * b_O[l],

(r0: the CLS embedding after ln_pre; a_l, m_l: attention and MLP outputs of block
l at the CLS position; the softmax row sums to one, so the value bias is shared
out by attention). LN_post is linear once its per-image scale sigma(r) is frozen:

    LN_post(r) = gamma * (r - mean(r)) / sigma + beta.

**Convention.** Each piece c is centred by its *own* mean (the centring map C is
linear, so the centred pieces sum to the centred stream), scaled by gamma/sigma,
projected by P and divided by the norm of the image embedding. The constant
``(P^T beta + b_P) / ||emb||`` (b_P: the projection's bias, EVA01's; zero in
other towers) and the attention output biases ``ls1 * b_O`` are kept as
named pieces of their own instead of being spread over heads. With these
conventions the pieces sum *exactly* to the unit image embedding, and dotting
with a unit text embedding splits the cosine similarity additively.

``convention="published"`` gives instead the values of the original code
(TextSpan, arXiv 2310.05916): pieces are mapped without centring; the stream's
mean and beta are shared out equally over the 2L+1 stream pieces (CLS embedding,
L attention layers, L MLPs), an attention layer's share and its ``ls1 * b_O``
equally over its heads and source tokens. ``attn_bias`` and ``constant`` are then
zero; the pieces still sum exactly to the unit embedding.

Fast path: ``U[l,h] = (ls1 * W_O[l,h])^T C diag(gamma) P`` (head_dim x D) is fixed
per model, so a head's contribution is ``z[l,h] @ U[l,h] / (sigma * ||emb||)``
with ``z`` the CLS row of that head's attention result. Only the CLS query row of
the attention matrix is computed explicitly; the last block computes only its
CLS row. Per-token pieces (``spatial=True``) multiply each value vector by its
attention weight before the projection, never materialising [B, N, N, H, width].

**Where the pieces come from.** The model only computes; the decomposition reads
one pass of its block loop through hook points (``_Readout``: ``HookPoints.add``
hooks, which need only the rows reaching the embedding, so the last block stays
cut short): the stream's start, each layer's attention (``hook_attn_out``, or the
heads' results ``attn.hook_z`` with the CLS query's row ``attn.hook_cls_pattern``
and the values ``attn.hook_v`` in an analysed layer) and MLP outputs, the final
stream and the embedding; in an attention-pooled tower, the pooling head's pattern,
values, result and MLP. Each block's output map (``Block.out_weight()`` and
``out_bias()``: ``ls1 * W_O``, ``ls1 * b_O``) is the one the forward applies. In a
reduced precision, an analysed layer's output projection at the rows that reach
the embedding is recomputed in float32 (a hook on ``hook_attn_out``), as the pieces
are mapped: they then sum to the embedding that pass computes.

**Average pooling** (CLIPA: the mean of the patch rows, the CLS row left out, then
LN_post on that one vector). The mean is a fixed weight 1/N per patch row, so the
pooled row is a sum of the same pieces as the CLS row, each the patches' mean;
LN_post's scale is frozen per image on the pooled row and the CLS-pooled map
applies unchanged. A head splits over source tokens by the patch queries' mean
attention row ``mean_{i>=1} A[l,h][i, :]`` (it sums to one); the readout keeps the
patches' mean of each activation as the loop produces it.

**EVA02** (docs/decomposition.md). Rotary embeddings change only the pattern. A
LayerNorm over the concatenated heads and a post-norm on the attention branch are
centring (linear) times a per-token scale: with the scales at the CLS row frozen
(read at ``attn.ln.hook_scale``, ``ln1_post.hook_scale``) the map is
``Block.out_weight()`` (gains and centring folded in) divided by them, and the norms'
biases join the ``attn_bias`` piece. SwiGLU, its sub-LN and the MLP's post-norm stay
inside the one MLP piece.

**Attention pooling** (SigLIP's MAP head: no CLS token, LN_post on every token,
one learned query over them, then ``y + MLP(LN(y))``). Freeze the pooling pattern
``A[p, i]`` (pooling head p, token i) and each token's LN_post scale ``sigma_i``;
a residual piece c at token i then reaches ``y`` linearly,

    c -> sum_p A[p, i] * W_O[p] W_V[p] (gamma * C c) / sigma_i,

so every piece of the stream (the encoder's heads at every token, biases, other
layers, MLPs, the token embeddings) keeps an exact, additive contribution. The
value bias, ``W_V beta`` and the pooling output bias are constants (the pattern
sums to one); the pooling MLP ``MLP(LN(y))`` is nonlinear and stays one named
piece (``pool_mlp``). Per-token pieces of the heads are per stream position (the
token the pooling head reads). The pooling head's own heads per source token
(``pool_heads``, ``pool_head_tokens``) are another partition of the same vector,
with ``pool_bias`` and ``pool_mlp`` (``pool_view()``), not part of ``total()``.

**Multi-query attention pooling** (CoCa: a CLS token, LN_k on every token, the pooler's first query over them,
then LN_post on that pooled row ``y`` and the projection; no MLP). As for SigLIP's head, with the pattern and each
token's LN_k scale frozen, and the pooled row's LayerNorm scale ``sigma_y`` frozen per image (its centring is
linear), a piece c at token i reaches the embedding linearly:

    c -> P^T (gamma_y * C sum_p A[p, i] * W_O[p] W_V[p] (gamma_k * C c) / sigma_i) / sigma_y,

so every piece keeps an exact share and ``pool_mlp`` is empty; the constants (LN_k's beta and the value bias
through the pattern, the output bias, LN_post's beta) are ``constant``. Per-token pieces are per stream position
(CLS + patches).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from .conventions import CONVENTIONS, DEFAULT_CONVENTION  # noqa: F401 (re-exported: decompose.CONVENTIONS)
from .errors import ClipInterpretError, ImageLoadError
from .images import LoadFailure

DEFAULT_LAST_LAYERS = 4


def check_convention(convention: str) -> str:
    """A valid convention name (see the module doc), or a clear error. Called once, where a
    convention enters (``decompose``, ``decompose_pixels``, ``index_images``, the CLI's choices)."""
    if convention not in CONVENTIONS:
        raise ClipInterpretError(f"unknown convention {convention!r}; choose centred (each piece centred by its own "
                                 "mean, constants as pieces of their own) or published (the original code's shares)")
    return convention


def resolve_layers(layers, n_layers: int) -> list[int]:
    """``None`` -> the last 4 layers; ``"all"``; or ints (negative counts from the end). Sorted, unique."""
    if layers is None:
        return list(range(max(0, n_layers - DEFAULT_LAST_LAYERS), n_layers))
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            return list(range(n_layers))
        try:
            layers = [int(part) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise ClipInterpretError(f"bad layer list {layers!r}: expected comma-separated integers, e.g. 8,9,10,11, "
                                     "or 'all'") from None
    if isinstance(layers, int):
        layers = [layers]
    resolved = []
    for layer in layers:
        index = int(layer)
        if not -n_layers <= index < n_layers:
            raise ClipInterpretError(f"layer {layer} is out of range: the model has {n_layers} layers "
                                     f"(0-{n_layers - 1}, or -1 to -{n_layers} from the end)")
        resolved.append(index % n_layers)
    if not resolved:
        raise ClipInterpretError("no layers chosen; give at least one layer index")
    return sorted(set(resolved))


def head_name(layer: int, head: int) -> str:
    return f"L{layer}.H{head}"


def parse_head(name: str | tuple[int, int]) -> tuple[int, int]:
    """``"L10.H3"`` or ``(10, 3)`` -> ``(10, 3)``."""
    if isinstance(name, tuple):
        return int(name[0]), int(name[1])
    text = str(name).strip().upper()
    try:
        layer, head = text.split(".")
        if not (layer.startswith("L") and head.startswith("H")):
            raise ValueError
        return int(layer[1:]), int(head[1:])
    except ValueError:
        raise ClipInterpretError(f"bad head name {name!r}: expected the form L10.H3 (layer 10, head 3)") from None


def select_heads(heads, layers: list[int], n_heads: int, where: str = "") -> list[str]:
    """Canonical head names for a selection: ``"all"``/None (every analysed head), a name
    (``"L5.H3"``, or comma-separated names) or a list. Heads outside ``layers`` are refused."""
    everything = [head_name(layer, h) for layer in layers for h in range(n_heads)]
    if heads is None or (isinstance(heads, str) and heads.strip().lower() in ("all", "all heads")):
        return everything
    if isinstance(heads, str):
        heads = [part for part in heads.split(",") if part.strip()]
    elif isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(x, numbers.Integral) for x in heads):
        heads = [heads]
    chosen = []
    for item in heads:
        layer, h = parse_head(item)
        name = head_name(layer, h)
        if layer not in layers:
            raise ClipInterpretError(f"head {name} is outside the analysed layers {layers}{where}; "
                                     f"choose a head of layers {layers[0]}-{layers[-1]}")
        if not 0 <= h < n_heads:
            raise ClipInterpretError(f"head {name} does not exist: layers have heads 0-{n_heads - 1}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ClipInterpretError("no heads chosen; name at least one head (e.g. L5.H3) or 'all'")
    return sorted(chosen, key=everything.index)


@dataclass
class Decomposition:
    """Pieces of the unit image embedding in the joint space; they sum to ``embedding``.

    ``heads``: [B, L, H, D], each analysed head's contribution (summed over tokens).
    ``head_tokens``: [B, L, T, H, D] per token, only when ``spatial`` (``None`` otherwise);
    ``head_tokens.sum(2)`` equals ``heads``. T = CLS + patches (the CLS row's source tokens)
    in a CLS-pooled tower, and in an average-pooled one (the source tokens of the patch queries'
    mean row); the patches (the stream positions the pooling head reads) in an
    attention-pooled one (``class_token`` False); CLS + patches, the stream positions the pooler
    reads, in a CoCa tower (multi-query pooling, ``class_token`` True).
    ``attn_bias``: [B, L, D], the attention output bias of each analysed layer.
    ``other_attn``: [B, len(other_layers), D], whole attention outputs of the layers
    not analysed (the earlier layers under the default choice).
    ``mlps``: [B, n_layers, D], every block's MLP output.
    ``cls_embed``: [B, D], the token embedding: the CLS token's (class + position, after
    ln_pre), in an average-pooled tower the patch tokens' mean, or in an attention-pooled tower every patch token's (patch + position).
    ``pool_mlp``: [B, 1, D], the pooling head's MLP (nonlinear: one piece); [B, 0, D] when
    the tower pools by its CLS token.
    ``constant``: [B, D], the constant terms: ``P^T beta / ||emb||`` (CLS pooling), or what
    LN_post's beta and the pooling head's biases give (attention pooling).

    ``convention``: ``centred`` or ``published`` (then ``attn_bias`` and ``constant`` are
    zero: they are shared out over the other pieces; see the module doc).

    Attention-pooled towers also carry the pooling head's own partition (``pool_view()``):
    ``pool_heads`` [B, Hp, D] (each pooling head, summed over source tokens),
    ``pool_head_tokens`` [B, Hp, T, D] (per source token, only when ``spatial``) and
    ``pool_bias`` [B, D] (its output bias, and the projection's bias where the tower has one: PE-Core); with
    ``pool_mlp`` they sum to ``embedding``.

    Every tensor is float32 on the CPU, whatever device and precision computed it.
    """

    heads: torch.Tensor
    attn_bias: torch.Tensor
    other_attn: torch.Tensor
    mlps: torch.Tensor
    cls_embed: torch.Tensor
    pool_mlp: torch.Tensor
    constant: torch.Tensor
    embedding: torch.Tensor
    layers: list[int]
    other_layers: list[int]
    grid: tuple[int, int]
    image_size: tuple[int, int]
    head_tokens: torch.Tensor | None = None
    class_token: bool = True
    pool_heads: torch.Tensor | None = None
    pool_head_tokens: torch.Tensor | None = None
    pool_bias: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    failures: list[LoadFailure] = field(default_factory=list)
    precision: str = "fp32"
    convention: str = DEFAULT_CONVENTION

    PIECES = ("heads", "attn_bias", "other_attn", "mlps", "cls_embed", "pool_mlp", "constant")
    OPTIONAL = ("head_tokens", "pool_heads", "pool_head_tokens", "pool_bias")

    @property
    def spatial(self) -> bool:
        return self.head_tokens is not None

    @property
    def n_heads(self) -> int:
        return self.heads.shape[-2]

    @property
    def head_names(self) -> list[str]:
        return [head_name(layer, h) for layer in self.layers for h in range(self.n_heads)]

    def head_contributions(self) -> torch.Tensor:
        """Head pieces [B, L, H, D] (the same as ``heads``)."""
        return self.heads

    def to(self, device) -> "Decomposition":
        """This decomposition with every tensor on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in (*self.PIECES, "embedding")}
        optional = {name: getattr(self, name) for name in self.OPTIONAL}
        return replace(self, **moved, **{k: v.to(device) if v is not None else None for k, v in optional.items()})

    def pieces(self) -> dict[str, torch.Tensor]:
        """Every piece as [B, K, D] (heads flattened over layers, and tokens)."""
        b, d = self.embedding.shape
        return {name: getattr(self, name).reshape(b, -1, d) for name in self.PIECES}

    def total(self) -> torch.Tensor:
        """The sum of all pieces [B, D]; equals ``embedding`` (exact up to float rounding)."""
        return sum(piece.sum(dim=1) for piece in self.pieces().values())

    def pool_view(self) -> dict[str, torch.Tensor]:
        """The pooling head's own partition of the embedding, as the published SigLIP script
        splits it: each pooling head per source token (``pool_heads``, [B, Hp*T, D] with
        ``spatial``, else [B, Hp, D]), its output bias and its MLP. Another partition of the
        same vector as ``pieces()``: the two are never added together."""
        if self.pool_heads is None:
            raise ClipInterpretError("this tower pools by its CLS token: it has no attention-pooling head")
        b, d = self.embedding.shape
        heads = self.pool_head_tokens if self.pool_head_tokens is not None else self.pool_heads
        return {"pool_heads": heads.reshape(b, -1, d), "pool_bias": self.pool_bias[:, None],
                "pool_mlp": self.pool_mlp}

    def _index(self, heads) -> tuple[list[int], list[int]]:
        """Resolve a head selection (see ``select_heads``) to (layer positions, head indices)."""
        chosen = [parse_head(name) for name in select_heads(heads, self.layers, self.n_heads)]
        return [self.layers.index(layer) for layer, _ in chosen], [head for _, head in chosen]

    @staticmethod
    def _texts(text_emb: torch.Tensor) -> torch.Tensor:
        return text_emb[None] if text_emb.ndim == 1 else text_emb

    def head_similarity(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Each head's share of the image-text cosine similarity: [B, L, H, n_texts]."""
        return self.head_contributions() @ self._texts(text_emb).to(self.embedding).T

    def similarity(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Full image-text cosine similarity [B, n_texts] (the sum of every piece's share)."""
        return self.embedding @ self._texts(text_emb).to(self.embedding).T

    def token_similarity(self, text_emb: torch.Tensor, heads=None) -> torch.Tensor:
        """Per-token share [B, T, n_texts] of the chosen heads (default: all analysed heads)."""
        if not self.spatial:
            raise ClipInterpretError("per-token similarity needs a spatial decomposition; call "
                                     "decompose(..., spatial=True)")
        positions, indices = self._index(heads)
        chosen = self.head_tokens[:, positions, :, indices]  # advanced indices first: [K, B, T, D]
        return chosen.sum(dim=0) @ self._texts(text_emb).to(self.embedding).T

    def similarity_maps(self, text_emb: torch.Tensor, heads=None, upsample: bool = True) -> torch.Tensor:
        """Patch-grid maps [B, n_texts, gh, gw] of the chosen heads' per-patch share of the
        similarity; upsampled bilinearly to the model's input image size when ``upsample``."""
        tokens = self.token_similarity(text_emb, heads)
        tokens = tokens[:, 1:] if self.class_token else tokens  # the patches
        b, _, n = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, n, *self.grid)
        if upsample:
            grid = F.interpolate(grid, size=self.image_size, mode="bilinear", align_corners=False)
        return grid

    def top_heads(self, text_emb: torch.Tensor, k: int = 5) -> list[list[list[tuple[str, float]]]]:
        """For each image and text, the k heads with the largest share: ``[b][t] -> [(name, score)]``."""
        scores = self.head_similarity(text_emb)  # [B, L, H, n]
        b, _, _, n = scores.shape
        flat = scores.reshape(b, -1, n)
        k = min(k, flat.shape[1])
        values, order = flat.topk(k, dim=1)
        names = self.head_names
        return [[[(names[order[i, j, t]], float(values[i, j, t])) for j in range(k)] for t in range(n)]
                for i in range(b)]


def _map(c: torch.Tensor, g_centered: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Residual-space pieces [B, ..., width] -> joint space [B, ..., D] (centre, gamma, P, /sigma|emb|)."""
    out = c.float() @ g_centered
    return out / scale.view(-1, *([1] * (out.ndim - 1)))


def _published_shares(heads, tokens, attn_bias, other_attn, mlps, cls_embed, constant, mean_term, n_layers):
    """Uncentred pieces -> the original code's: the LN_post terms (``constant``, ``mean_term``:
    the joint-space images of beta and of -mean(r)) equally over the 2L+1 stream pieces, an
    attention layer's share and output bias equally over its heads and tokens."""
    per_piece = (constant + mean_term)[:, None] / (2 * n_layers + 1)  # [B, 1, D]
    per_head = (attn_bias + per_piece) / heads.shape[2]  # [B, L, D]
    if tokens is not None:
        tokens = tokens + (per_head / tokens.shape[2])[:, :, None, None]
    return (heads + per_head[:, :, None], tokens, torch.zeros_like(attn_bias), other_attn + per_piece,
            mlps + per_piece, cls_embed + per_piece[:, 0], torch.zeros_like(constant))


@torch.no_grad()
def decompose_pixels(vit, pixels: torch.Tensor, layers=None, spatial: bool = False,
                     precision: str = "fp32", fwd_hooks=(), convention: str = DEFAULT_CONVENTION, *,
                     checked: bool = False) -> Decomposition:
    """Decompose preprocessed pixels [B, 3, H, W] with a HookedViT (see the module doc).

    The result stays on the pixels' device (``decompose`` hands it back on the CPU).
    ``precision``: compute precision of the matrix work (``fp32``, ``bf16``, ``fp16``);
    LayerNorm statistics, the residual stream and the map to the joint space are float32.
    ``fwd_hooks``: hooks on the forward (``HookedViT.run_with_hooks``): the pieces then
    decompose the intervened model's embedding. ``convention``: ``centred`` or ``published``.
    ``checked``: the caller has checked ``precision`` and ``convention`` already, where they
    entered (``decompose`` and ``index_images`` call this once per batch and check them once).
    """
    from .device import check_precision, compute, full_precision

    cfg = vit.cfg
    device = pixels.device
    if not checked:
        precision, convention = check_precision(precision), check_convention(convention)
    chosen = resolve_layers(layers, cfg.layers)
    others = [i for i in range(cfg.layers) if i not in set(chosen)]
    published = convention == "published"
    if published and vit.pool is not None:
        raise ClipInterpretError("the published convention is defined for towers that pool by their CLS token; "
                                 f"this tower pools by attention: use convention={DEFAULT_CONVENTION!r}")
    if vit.pool is not None or cfg.pool != "cls":
        nonlinear = [i for i in chosen if not vit.blocks[i].linear_output]
        if nonlinear:
            raise ClipInterpretError(f"layer {nonlinear[0]} of this {cfg.pool!r}-pooled tower has a LayerNorm over "
                                     "its heads or a post-norm: only CLS-pooled towers split such a layer by head; "
                                     "analyse other layers (layers=...)")
    read = _Readout(vit, chosen, spatial, fwd_hooks)
    with compute(device, precision):
        vit.run(pixels, read.points)
    with full_precision(device):
        pieces = (_multi_query_pieces if cfg.pool == "attn-pool" else _cls_pieces if vit.pool is None
                  else _pooled_pieces)
        parts = pieces(vit, read, chosen, others, spatial, published)
    return Decomposition(**parts, layers=chosen, other_layers=others, grid=cfg.grid, image_size=tuple(cfg.image_size),
                         class_token=cfg.class_token, precision=precision,
                         convention=convention)


def _read(value, name):
    """A hook that only asks the loop for its activation."""


# the rows of a stream activation [B, T, ...] that reach the embedding, per pooling: the CLS row; the mean of
# the patch rows (in float32); every row (the attention-pooling head reads each)
_ROWS = {"cls": lambda value: value[:, :1], "avg": lambda value: value[:, 1:].float().mean(dim=1, keepdim=True),
         "map": lambda value: value, "attn-pool": lambda value: value}


class _Readout:
    """What the decomposition reads from one pass of the model's block loop, through hook points
    added after ``fwd_hooks`` (so it reads what they left), at the rows that reach the embedding
    ([B, R, width]: R = 1, the CLS row, in a CLS-pooled tower; every token in an attention-pooled
    one): the stream's start (``resid0``), the attention outputs of the layers not analysed
    (``attn``), every MLP output (``mlp``), the analysed heads' results (``head_z``: [B, H, d] at the
    CLS row, [B, H, T, d] per source token with ``spatial``, or per row of an attention-pooled
    tower), the final stream (``final``) and the embedding; and the pooling head's pattern,
    values, result and MLP (``pool_*``). In a reduced precision an analysed layer's output
    projection at those rows is recomputed in float32 (a hook on ``hook_attn_out`` before
    ``fwd_hooks``), as the pieces are mapped, so that they sum to the embedding of this pass."""

    def __init__(self, vit, chosen: list[int], spatial: bool, fwd_hooks=()):
        from .models.hooked_vit import CLS_PATTERN, INNER_SCALE, POST_SCALE, HookPoints

        self.points = points = HookPoints(vit, fwd_hooks)
        kind = vit.cfg.pool
        by_cls = kind == "cls"
        by_row = vit.pool is None  # one pooled row through LN_post: the CLS row, or the patch rows' mean ("avg")
        self._rows = _ROWS[kind]
        self.resid0 = self.final = self.embedding = None
        self.attn, self.mlp, self.head_z = {}, [], {}
        self.inner_scale, self.post_scale = {}, {}  # analysed layers' norm scales in the output map, [B, R]
        self._z, self._seen, self._v, self._cls = {}, {}, {}, {}  # held from one hook point to a later one
        self.pool_linear = True  # False when a hook replaced LN_post, the pooling values or its result: the
        #                          tokens' pieces then no longer reach the result through W_V and the pattern
        points.add("hook_embed", self._keep("resid0"))
        for layer, block in enumerate(vit.blocks):
            name = f"blocks.{layer}."
            if layer in chosen:
                if by_row and spatial:
                    points.add(name + "attn.hook_v", self._keep_in("_v", layer, rows=False))
                    points.add(name + "attn.hook_z", self._see, first=True)
                if by_cls:  # the loop computes the CLS query's row explicitly: it splits the CLS result by token
                    points.add(name + CLS_PATTERN, self._keep_in("_cls", layer, rows=False) if spatial else _read)
                elif by_row and spatial:  # the patch queries' mean attention row splits their mean result
                    points.add(name + "attn.hook_pattern", self._mean_row(layer))
                points.add(name + "attn.hook_z", self._heads(layer, by_row, spatial))
                if block.ln_inner is not None:
                    points.add(name + INNER_SCALE, self._keep_in("inner_scale", layer))
                if block.ln1_post is not None:
                    points.add(name + POST_SCALE, self._keep_in("post_scale", layer))
                points.add(name + "hook_attn_out", self._in_float32(vit, block, layer, by_cls), first=True)
            else:
                points.add(name + "hook_attn_out", self._keep_in("attn", layer))
            points.add(name + "hook_mlp_out", self._append_mlp)
        points.add(f"blocks.{vit.cfg.layers - 1}.hook_resid_post", self._keep("final"))
        points.add("hook_image_embed", self._keep("embedding", rows=False))
        if not by_row:
            checked = ("ln_post.hook_normalized", "pool.hook_v", "pool.hook_z") + (("pool.hook_attn_out",)
                                                                                    if kind == "attn-pool" else ())
            for point in checked:
                points.add(point, self._see, first=True)
                points.add(point, self._check_same)
            points.add("pool.hook_pattern", self._keep("pool_pattern", rows=False))
            points.add("pool.hook_v", self._keep("pool_values", rows=False))
            points.add("pool.hook_z", self._keep("pool_z", rows=False))
            if kind == "attn-pool":  # no pooling MLP; the pooled row's LayerNorm reads y as the hooks left it
                points.add("pool.hook_attn_out", self._keep("pool_y", rows=False))
            else:
                points.add("pool.hook_mlp_out", self._keep("pool_mlp", rows=False))

    def _keep(self, attr: str, rows: bool = True):
        def keep(value, name):
            setattr(self, attr, self._rows(value) if rows else value)
        return keep

    def _keep_in(self, attr: str, layer: int, rows: bool = True):
        def keep(value, name):
            getattr(self, attr)[layer] = self._rows(value) if rows else value
        return keep

    def _append_mlp(self, value, name):
        self.mlp.append(self._rows(value))

    def _see(self, value, name):
        """The activation as the loop computed it, before any ``fwd_hooks``."""
        self._seen[name] = value

    def _check_same(self, value, name):
        if value is not self._seen.pop(name):
            self.pool_linear = False

    def _mean_row(self, layer: int):
        def keep(pattern, name):  # [B, H, T, T] -> the patch queries' mean row [B, H, 1, T]
            self._cls[layer] = pattern[:, :, 1:].float().mean(dim=2, keepdim=True)
        return keep

    def _heads(self, layer: int, by_row: bool, spatial: bool):
        def keep(z, name):
            self._z[layer] = z
            if not by_row:
                self.head_z[layer] = z
            elif spatial:
                if z is not self._seen.pop(name):
                    raise ClipInterpretError(f"a hook on {name} changes the heads' results: they no longer "
                                             "split by token; decompose that layer without spatial=True")
                self.head_z[layer] = self._cls.pop(layer).transpose(-1, -2) * self._v.pop(layer)
            else:
                self.head_z[layer] = self._rows(z.transpose(1, 2)).transpose(1, 2)[:, :, 0]
        return keep

    def _in_float32(self, vit, block, layer: int, by_cls: bool):
        def recompute(attn, name):
            z = self._z.pop(layer)
            if z.dtype == torch.float32:
                return None
            # the norms inside the output map (if any) recomputed too: their scales are those of these rows
            hooks = {kind: self._scale_of(store, layer) for kind, store in (("inner", self.inner_scale),
                                                                            ("post", self.post_scale))}
            with torch.autocast(device_type=z.device.type, enabled=False):
                if not by_cls:
                    return block.attn_output(vit.merge_heads(z.float()), scale_hooks=hooks)
                return torch.cat([block.attn_output(vit.merge_heads(z[:, :, :1].float()), scale_hooks=hooks),
                                  attn[:, 1:].float()], dim=1)
        return recompute

    def _scale_of(self, store: dict, layer: int):
        def keep(scale):
            store[layer] = self._rows(scale)
            return scale
        return keep


def _cls_pieces(vit, read: _Readout, chosen: list[int], others: list[int], spatial: bool, published: bool = False) -> dict:
    """The pieces of a CLS-pooled tower: every piece of the final CLS row through LN_post (its
    scale frozen) and the projection; ``published``: the original code's shares (module doc)."""
    cfg = vit.cfg
    # Map from residual space to the joint space, before the per-image 1/(sigma*|emb|):
    # c -> (c - mean(c)) * gamma @ P = c @ (G - mean_rows(G)), G = diag(gamma) P.
    g = vit.ln_post.weight[:, None] * vit.proj
    g_centered = g if published else g - g.mean(dim=0, keepdim=True)  # published: centred by shares below
    r = read.final[:, 0].float()
    sigma = torch.sqrt(r.var(dim=-1, unbiased=False) + cfg.ln_eps)
    emb = read.embedding.float()
    norm = emb.norm(dim=-1)
    scale = sigma * norm
    batch = r.shape[0]

    head_pieces, token_pieces, bias_terms = [], [], []
    for index in chosen:
        block = vit.blocks[index]
        u = (block.out_weight().T @ g_centered).view(cfg.heads, cfg.head_dim, -1)  # [H, d, D]
        z = read.head_z[index].float()
        head_scale, bias = _frozen_output_scales(read, block, index, scale, batch)
        if spatial:
            piece = torch.einsum("bhtd,hdk->bthk", z, u)  # [B, T, H, D]
            piece = piece / head_scale.view(-1, 1, 1, 1)
            token_pieces.append(piece)
            head_pieces.append(piece.sum(dim=1))
        else:
            piece = torch.einsum("bhd,hdk->bhk", z, u)  # [B, H, D]
            head_pieces.append(piece / head_scale.view(-1, 1, 1))
        bias_terms.append(bias)
    attn_bias = _map(torch.stack(bias_terms, dim=1), g_centered, scale)
    if others:
        other_attn = _map(torch.stack([read.attn[i][:, 0] for i in others], dim=1), g_centered, scale)
    else:
        other_attn = emb.new_zeros(batch, 0, emb.shape[-1])
    mlps = _map(torch.stack([m[:, 0] for m in read.mlp], dim=1), g_centered, scale)
    cls_embed = _map(read.resid0[:, 0], g_centered, scale)
    constant = _projected_bias(vit, vit.ln_post.bias @ vit.proj).expand(batch, -1) / norm[:, None]
    heads, tokens = torch.stack(head_pieces, dim=1), torch.stack(token_pieces, dim=1) if spatial else None
    if published:
        mean_term = -(r.mean(dim=-1) / scale)[:, None] * g.sum(dim=0)
        heads, tokens, attn_bias, other_attn, mlps, cls_embed, constant = _published_shares(
            heads, tokens, attn_bias, other_attn, mlps, cls_embed, constant, mean_term, cfg.layers)
    return dict(
        heads=heads, attn_bias=attn_bias, other_attn=other_attn, mlps=mlps, cls_embed=cls_embed,
        pool_mlp=emb.new_zeros(batch, 0, emb.shape[-1]), constant=constant, embedding=emb / norm[:, None],
        head_tokens=tokens,
    )


def _frozen_output_scales(read: _Readout, block, index: int, scale: torch.Tensor, batch: int):
    """A CLS-pooled layer's head divisor [B] (``sigma * ||emb||``, times the frozen per-token scales of a
    LayerNorm over the heads and of a post-norm at the CLS row, where the block has them) and its output
    bias [B, width] in the residual stream (``out_bias()``, over the post-norm's frozen scale, plus that
    norm's own bias): the heads' pieces and this bias sum to the block's attention output at the CLS row."""
    bias = block.out_bias().float().expand(batch, -1)
    if block.linear_output:
        return scale, bias
    head_scale = scale
    if index in read.inner_scale:
        head_scale = head_scale * read.inner_scale[index][:, 0].float()
    if index in read.post_scale:
        post = read.post_scale[index][:, 0].float()
        head_scale = head_scale * post
        bias = bias / post[:, None] + block.out_post_bias().float()
    return head_scale, bias


def _projected_bias(vit, constant: torch.Tensor) -> torch.Tensor:
    """A constant in the joint space plus the projection's own bias, when the tower has one (EVA01's head)."""
    return constant + vit.proj_bias if getattr(vit, "proj_bias", None) is not None else constant


def _through_pool(vit, read: _Readout, chosen: list[int], others: list[int], spatial: bool, weights: torch.Tensor,
                  value_in: torch.Tensor, out_map: torch.Tensor) -> dict:
    """The stream's pieces through an attention-pooling head whose pattern and token scales are frozen in
    ``weights`` [B, Hp, T]: a token's piece c -> its values ``c @ value_in`` [Hp, width, d], weighted by the
    pattern, then ``out_map`` [Hp, d, D]. Shared by the MAP head (SigLIP, PE-Core) and CoCa's pooler: the
    analysed heads (per token when ``spatial``) with their output biases, the other layers' attention, the
    MLPs and the embeddings."""
    cfg = vit.cfg

    def through_pool(stream: torch.Tensor) -> torch.Tensor:
        """A piece at every token [B, T, width] -> its contribution [B, D]."""
        pooled = torch.einsum("bpt,btw->bpw", weights, stream.float())
        return torch.einsum("bpe,ped->bd", torch.einsum("bpw,pwe->bpe", pooled, value_in), out_map)

    def constant_through_pool(c: torch.Tensor) -> torch.Tensor:
        """The same piece c [width] at every token -> [B, D]."""
        return torch.einsum("bp,pe,ped->bd", weights.sum(dim=-1), torch.einsum("w,pwe->pe", c, value_in), out_map)

    col_weights = weights.repeat_interleave(value_in.shape[2], dim=1).transpose(1, 2)  # [B, T, e]: per value column
    value_flat = value_in.transpose(0, 1).reshape(value_in.shape[1], -1)  # [width, e]
    out_flat = out_map.reshape(-1, out_map.shape[-1])  # [e, D]
    head_pieces, token_pieces, bias_pieces = [], [], []
    for index in chosen:
        block = vit.blocks[index]
        w_o = block.out_weight().T.reshape(cfg.heads, cfg.head_dim, cfg.width)  # [H, d, width]
        z = read.head_z[index].float()  # [B, H, T, d]
        if spatial:
            out = torch.einsum("bhtd,hdw->bthw", z, w_o) @ value_flat  # [B, T, H, e]: the pooled values
            piece = (out * col_weights[:, :, None]) @ out_flat  # [B, T, H, D]
            token_pieces.append(piece)
            head_pieces.append(piece.sum(dim=1))
        else:
            out = torch.einsum("bhpd,hdw->bphw", torch.einsum("bpt,bhtd->bhpd", weights, z), w_o)
            head_pieces.append(torch.einsum("bphe,ped->bhd", torch.einsum("bphw,pwe->bphe", out, value_in), out_map))
        bias_pieces.append(constant_through_pool(block.out_bias()))
    empty = weights.new_zeros(weights.shape[0], 0, out_map.shape[-1])
    return dict(heads=torch.stack(head_pieces, dim=1), attn_bias=torch.stack(bias_pieces, dim=1),
                other_attn=torch.stack([through_pool(read.attn[i]) for i in others], dim=1) if others else empty,
                mlps=torch.stack([through_pool(m) for m in read.mlp], dim=1), cls_embed=through_pool(read.resid0),
                head_tokens=torch.stack(token_pieces, dim=1) if spatial else None)


def _pooled_pieces(vit, read: _Readout, chosen: list[int], others: list[int], spatial: bool, published: bool = False) -> dict:
    """The pieces of an attention-pooled tower: every piece of the final stream, at every token,
    through LN_post (each token's scale frozen), the pooling head's values and its frozen pattern,
    its output projection and the projection; the pooling MLP as one piece (module doc)."""
    cfg, pool = vit.cfg, vit.pool
    if not read.pool_linear:
        raise ClipInterpretError("a hook replaces LN_post, the pooling head's values or its result: the tokens' "
                                 "pieces no longer reach the embedding through the pooling head; decompose "
                                 "without that hook")
    w, n_pool = cfg.width, cfg.pool_heads
    d_pool = w // n_pool
    x = read.final.float()  # [B, T, width]
    emb = read.embedding.float()
    norm = emb.norm(dim=-1)
    sigma = torch.sqrt(x.var(dim=-1, unbiased=False) + cfg.ln_eps)  # [B, T]
    # the frozen pattern over the frozen LN scales, and the embedding's norm: [B, Hp, T]
    pattern = read.pool_pattern[:, :, 0].float()  # [B, Hp, T]: the query's attention over the tokens
    weights = pattern / (sigma[:, None, :] * norm[:, None, None])
    # c -> (gamma * C c) W_V^T per pooling head: [Hp, width, d]; its output W_O^T (P): [Hp, d, D]
    w_v, b_v = pool.kv.weight[w:], pool.kv.bias[w:]
    value_in = vit.ln_post.weight[:, None] * w_v.T
    value_in = (value_in - value_in.mean(dim=0, keepdim=True)).view(w, n_pool, d_pool).transpose(0, 1)
    out_map = pool.out.weight.T @ vit.proj if vit.proj is not None else pool.out.weight.T
    out_map = out_map.reshape(n_pool, d_pool, -1)
    batch = x.shape[0]

    pieces = _through_pool(vit, read, chosen, others, spatial, weights, value_in, out_map)
    # constants: LN_post's beta and the value bias reach y through the pattern, which sums to one
    constant = ((vit.ln_post.bias @ w_v.T + b_v) @ pool.out.weight.T + pool.out.bias)
    pool_bias = pool.out.bias
    pool_mlp = read.pool_mlp.float()
    if vit.proj is not None:
        constant, pool_bias = _projected_bias(vit, constant @ vit.proj), _projected_bias(vit, pool_bias @ vit.proj)
        pool_mlp = pool_mlp @ vit.proj
    pool_z = read.pool_z[:, :, 0].float()  # [B, Hp, d]: each pooling head's result
    scaled = 1 / norm.view(-1, 1, 1)
    return dict(
        **pieces,
        pool_mlp=pool_mlp[:, None] / norm.view(-1, 1, 1), constant=constant.expand(batch, -1) / norm[:, None],
        embedding=emb / norm[:, None],
        pool_heads=torch.einsum("bpe,ped->bpd", pool_z, out_map) * scaled,
        pool_head_tokens=torch.einsum("bpt,bpte,ped->bptd", pattern, read.pool_values.float(),
                                      out_map) * scaled[..., None] if spatial else None,
        pool_bias=pool_bias.expand(batch, -1) / norm[:, None],
    )


def _multi_query_pieces(vit, read: _Readout, chosen: list[int], others: list[int], spatial: bool,
                        published: bool = False) -> dict:
    """The pieces of a tower pooled by CoCa's multi-query attentional pooler (its first query; module doc):
    every piece of the final stream, at every token, through LN_k (each token's scale frozen), the pooler's
    values and frozen pattern and its output projection, then the pooled row's LayerNorm (its scale frozen
    per image, centring linear) and the projection. No nonlinear piece is left: ``pool_mlp`` is empty."""
    cfg, pool = vit.cfg, vit.pool
    if not read.pool_linear:
        raise ClipInterpretError("a hook replaces LN_k, the pooler's values, its result or its output: the tokens' "
                                 "pieces no longer reach the embedding through the pooler; decompose without that hook")
    e, n_pool = cfg.pool_width, cfg.pool_heads
    d_pool = e // n_pool
    x = read.final.float()  # [B, T, width]
    emb = read.embedding.float()
    norm = emb.norm(dim=-1)
    batch = x.shape[0]
    sigma = torch.sqrt(x.var(dim=-1, unbiased=False) + cfg.ln_eps)  # [B, T]: LN_k per token
    y = read.pool_y.float()  # [B, e]: the pooled row before its LayerNorm
    sigma_y = torch.sqrt(y.var(dim=-1, unbiased=False) + pool.ln.eps)  # [B]
    pattern = read.pool_pattern[:, :, 0].float()  # [B, Hp, T]
    weights = pattern / (sigma[:, None, :] * (sigma_y * norm)[:, None, None])
    # a token's piece c -> (gamma_k * C c) W_V^T per pooler head [Hp, width, d]; a head's result z ->
    # C(W_O z) * gamma_y @ P [Hp, d, D] (the pooled row's centring is linear; its scale is in weights)
    w_v, b_v = pool.kv.weight[e:], pool.kv.bias[e:]
    value_in = vit.ln_post.weight[:, None] * w_v.T
    value_in = (value_in - value_in.mean(dim=0, keepdim=True)).view(cfg.width, n_pool, d_pool).transpose(0, 1)
    g = pool.ln.weight[:, None] * vit.proj  # [e, D]
    g_centred = g - g.mean(dim=0, keepdim=True)
    out_map = (pool.out.weight.T @ g_centred).reshape(n_pool, d_pool, -1)

    pieces = _through_pool(vit, read, chosen, others, spatial, weights, value_in, out_map)
    empty = emb.new_zeros(batch, 0, emb.shape[-1])
    scaled = 1 / (sigma_y * norm).view(-1, 1)
    # constants: LN_k's beta and the value bias reach y through the pattern (which sums to one), with the output
    # bias, through the pooled row's centring and gamma; its beta through the projection
    pool_bias = (pool.out.bias @ g_centred) * scaled + (pool.ln.bias @ vit.proj) / norm[:, None]
    constant = (((vit.ln_post.bias @ w_v.T + b_v) @ pool.out.weight.T) @ g_centred) * scaled + pool_bias
    pool_z = read.pool_z[:, :, 0].float()  # [B, Hp, d]: each pooler head's result
    return dict(
        **pieces,
        pool_mlp=empty, constant=constant, embedding=emb / norm[:, None],
        pool_heads=torch.einsum("bpe,ped->bpd", pool_z, out_map) * scaled[:, :, None],
        pool_head_tokens=torch.einsum("bpt,bpte,ped->bptd", pattern, read.pool_values.float(),
                                      out_map) * scaled[:, :, None, None] if spatial else None,
        pool_bias=pool_bias,
    )


@dataclass
class _Decompose:
    """Pixels -> their Decomposition on the CPU (picklable: on a CPU the reading workers run it)."""

    vit: torch.nn.Module
    layers: list[int]
    spatial: bool
    precision: str
    convention: str = DEFAULT_CONVENTION

    def __call__(self, pixels: torch.Tensor) -> Decomposition:
        return decompose_pixels(self.vit, pixels, layers=self.layers, spatial=self.spatial,
                                precision=self.precision, convention=self.convention, checked=True).to("cpu")


def _tensor_batches(pixels: torch.Tensor, batch_size: int, device):
    from .pipeline import PixelBatch

    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.shape[0] == 0:
        raise ClipInterpretError("empty image batch: the tensor has 0 images")
    for k, start in enumerate(range(0, pixels.shape[0], batch_size)):
        chunk = pixels[start:start + batch_size]
        yield PixelBatch(k, list(range(start, start + chunk.shape[0])), chunk.to(device), [])


def decompose(model, images: Any, layers: Sequence[int] | str | None = None, spatial: bool = False,
              batch_size: int = 32, on_error: str = "raise", precision: str | None = None,
              workers: int | None = None, decode: str = "auto", draft: bool = False,
              convention: str = DEFAULT_CONVENTION) -> Decomposition:
    """Decompose the image embeddings of ``images`` with ``model`` (a ClipModel).

    ``images``: image paths, bytes, PIL images, numpy arrays, or a preprocessed tensor
    [B, 3, H, W]. ``layers``: analysed layers (default: the last 4). ``spatial``: keep
    per-token head pieces. ``on_error``: ``"raise"`` or ``"skip"`` unreadable images
    (skipped ones are listed in ``Decomposition.failures``). ``precision``: compute
    precision (default: the model's, checked when it was set). ``workers``, ``decode``, ``draft``: the input
    pipeline (``clip_interpret.pipeline``; default: worker processes from 64 images on).
    ``convention``: ``centred`` (ours) or ``published`` (the original code's per-head
    values; see the module doc). The model computes on its device; the result is on the CPU.
    """
    from .device import is_out_of_memory, out_of_memory_error, resolve_precision
    from .pipeline import ListSource, pixel_batches

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if batch_size < 1:
        raise ClipInterpretError(f"batch size must be at least 1, got {batch_size}")
    vit = model.vit if hasattr(model, "vit") else model
    device = vit.device
    precision = resolve_precision(model, precision)
    chosen = resolve_layers(layers, vit.cfg.layers)
    compute = _Decompose(vit, chosen, spatial, precision, check_convention(convention))
    if isinstance(images, torch.Tensor):
        stream = _tensor_batches(images, batch_size, device)
        name = "<tensor[{}]>".format
    else:
        if isinstance(images, (str, bytes)) or not isinstance(images, Iterable):
            images = [images]
        source = ListSource(images)
        if not len(source):
            raise ClipInterpretError("no images given: the image list is empty")
        ranges = [list(range(s, min(len(source), s + batch_size))) for s in range(0, len(source), batch_size)]
        stream = pixel_batches(source, model.preprocess, ranges, device, workers=workers, decode=decode, draft=draft,
                               compute=compute)
        name = source.name
    parts, names, failures = [], [], []
    for batch in stream:
        if batch.failures and on_error == "raise":
            stream.close()
            raise ImageLoadError(batch.failures[0]["source"], batch.failures[0]["reason"])
        failures += [LoadFailure(f["index"], f["source"], f["reason"]) for f in batch.failures]
        if not batch.indices:
            continue
        try:
            parts.append(batch.result(compute))
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            stream.close()
            cfg = vit.cfg
            per_image = 2 * 4 * len(chosen) * cfg.n_tokens * cfg.heads * cfg.output_dim if spatial else None
            raise out_of_memory_error(device, batch_size, "while decomposing ", per_image) from None
        names += [name(i) for i in batch.indices]
    if not parts:
        reasons = "; ".join(f"{f.source}: {f.reason}" for f in failures[:3])
        raise ClipInterpretError(f"none of the {len(failures)} images could be read ({reasons})")
    result = parts[0] if len(parts) == 1 else _concat(parts)
    result.sources = names
    result.failures = failures
    return result


def _concat(parts: list[Decomposition]) -> Decomposition:
    first = parts[0]
    names = (*Decomposition.PIECES, "embedding") + tuple(n for n in Decomposition.OPTIONAL
                                                         if getattr(first, n) is not None)
    tensors = {name: torch.cat([getattr(p, name) for p in parts]) for name in names}
    return Decomposition(**tensors, layers=first.layers, other_layers=first.other_layers, grid=first.grid,
                         image_size=first.image_size, class_token=first.class_token, precision=first.precision,
                         convention=first.convention)
