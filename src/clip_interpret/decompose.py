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
``P^T beta / ||emb||`` and the attention output biases ``ls1 * b_O`` are kept as
named pieces of their own instead of being spread over heads. With these
conventions the pieces sum *exactly* to the unit image embedding, and dotting
with a unit text embedding splits the cosine similarity additively.

Fast path: ``U[l,h] = (ls1 * W_O[l,h])^T C diag(gamma) P`` (head_dim x D) is fixed
per model, so a head's contribution is ``z[l,h] @ U[l,h] / (sigma * ||emb||)``
with ``z`` the CLS row of that head's attention result. Only the CLS query row of
the attention matrix is computed explicitly; the last block computes only its
CLS row. Per-token pieces (``spatial=True``) multiply each value vector by its
attention weight before the projection, never materialising [B, N, N, H, width].
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import ClipInterpretError, ImageLoadError
from .images import LoadFailure

DEFAULT_LAST_LAYERS = 4


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
    ``head_tokens``: [B, L, T, H, D] per token (T = CLS + patches), only when ``spatial``
    (``None`` otherwise); ``head_tokens.sum(2)`` equals ``heads``.
    ``attn_bias``: [B, L, D], the attention output bias of each analysed layer.
    ``other_attn``: [B, len(other_layers), D], whole attention outputs of the layers
    not analysed (the earlier layers under the default choice).
    ``mlps``: [B, n_layers, D], every block's MLP output.
    ``cls_embed``: [B, D], the CLS token embedding (class + position, after ln_pre).
    ``constant``: [B, D], the LN_post bias term ``P^T beta / ||emb||``.

    Every tensor is float32 on the CPU, whatever device and precision computed it.
    """

    heads: torch.Tensor
    attn_bias: torch.Tensor
    other_attn: torch.Tensor
    mlps: torch.Tensor
    cls_embed: torch.Tensor
    constant: torch.Tensor
    embedding: torch.Tensor
    layers: list[int]
    other_layers: list[int]
    grid: tuple[int, int]
    image_size: tuple[int, int]
    head_tokens: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)
    failures: list[LoadFailure] = field(default_factory=list)
    precision: str = "fp32"

    PIECES = ("heads", "attn_bias", "other_attn", "mlps", "cls_embed", "constant")

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
        tokens = self.head_tokens.to(device) if self.head_tokens is not None else None
        return replace(self, **moved, head_tokens=tokens)

    def pieces(self) -> dict[str, torch.Tensor]:
        """Every piece as [B, K, D] (heads flattened over layers, and tokens)."""
        b, d = self.embedding.shape
        return {name: getattr(self, name).reshape(b, -1, d) for name in self.PIECES}

    def total(self) -> torch.Tensor:
        """The sum of all pieces [B, D]; equals ``embedding`` (exact up to float rounding)."""
        return sum(piece.sum(dim=1) for piece in self.pieces().values())

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
        tokens = self.token_similarity(text_emb, heads)[:, 1:]  # drop CLS
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


@torch.no_grad()
def decompose_pixels(vit, pixels: torch.Tensor, layers=None, spatial: bool = False,
                     precision: str = "fp32", fwd_hooks=()) -> Decomposition:
    """Decompose preprocessed pixels [B, 3, H, W] with a HookedViT (see the module doc).

    The result stays on the pixels' device (``decompose`` hands it back on the CPU).
    ``precision``: compute precision of the matrix work (``fp32``, ``bf16``, ``fp16``);
    LayerNorm statistics, the residual stream and the map to the joint space are float32.
    ``fwd_hooks``: hooks on the forward (``HookedViT.run_with_hooks``): the pieces then
    decompose the intervened model's embedding.
    """
    from .device import compute, full_precision
    from .models.hooked_vit import HookPoints

    cfg = vit.cfg
    device = pixels.device
    chosen = resolve_layers(layers, cfg.layers)
    chosen_set = set(chosen)
    points = HookPoints(vit, fwd_hooks) if fwd_hooks else None
    with compute(device, precision):
        trace = vit.run(pixels, points, cls_rows=chosen, token_z=spatial)
    r0, attn_cls, mlp_cls, head_z = trace.resid_cls0, trace.attn_cls, trace.mlp_cls, trace.head_z
    x_cls = trace.final_cls

    with full_precision(device):
        # Map from residual space to the joint space, before the per-image 1/(sigma*|emb|):
        # c -> (c - mean(c)) * gamma @ P = c @ (G - mean_rows(G)), G = diag(gamma) P.
        g = vit.ln_post.weight[:, None] * vit.proj
        g_centered = g - g.mean(dim=0, keepdim=True)
        r = x_cls.float()
        sigma = torch.sqrt(r.var(dim=-1, unbiased=False) + cfg.ln_eps)
        emb = vit.project(r)
        norm = emb.norm(dim=-1)
        scale = sigma * norm
        batch = pixels.shape[0]

        head_pieces, token_pieces, bias_terms = [], [], []
        for index in chosen:
            block = vit.blocks[index]
            w_o = block.out.weight * block.ls1[:, None] if block.ls1 is not None else block.out.weight
            u = (w_o.T @ g_centered).view(cfg.heads, cfg.head_dim, -1)  # [H, d, D]
            z = head_z[index].float()
            if spatial:
                piece = torch.einsum("bhtd,hdk->bthk", z, u)  # [B, T, H, D]
                piece = piece / scale.view(-1, 1, 1, 1)
                token_pieces.append(piece)
                head_pieces.append(piece.sum(dim=1))
            else:
                piece = torch.einsum("bhd,hdk->bhk", z, u)  # [B, H, D]
                head_pieces.append(piece / scale.view(-1, 1, 1))
            bias_terms.append(block.out.bias * block.ls1 if block.ls1 is not None else block.out.bias)
        others = [i for i in range(cfg.layers) if i not in chosen_set]
        attn_bias = _map(torch.stack([b.expand(batch, -1) for b in bias_terms], dim=1), g_centered, scale)
        if others:
            other_attn = _map(torch.stack([attn_cls[i] for i in others], dim=1), g_centered, scale)
        else:
            other_attn = emb.new_zeros(batch, 0, emb.shape[-1])
        mlps = _map(torch.stack(mlp_cls, dim=1), g_centered, scale)
        cls_embed = _map(r0, g_centered, scale)
        constant = (vit.ln_post.bias @ vit.proj).expand(batch, -1) / norm[:, None]
    return Decomposition(
        heads=torch.stack(head_pieces, dim=1), attn_bias=attn_bias, other_attn=other_attn, mlps=mlps,
        cls_embed=cls_embed, constant=constant, embedding=emb / norm[:, None], layers=chosen, other_layers=others,
        grid=cfg.grid, image_size=tuple(cfg.image_size),
        head_tokens=torch.stack(token_pieces, dim=1) if spatial else None, precision=precision,
    )


@dataclass
class _Decompose:
    """Pixels -> their Decomposition on the CPU (picklable: on a CPU the reading workers run it)."""

    vit: torch.nn.Module
    layers: list[int]
    spatial: bool
    precision: str

    def __call__(self, pixels: torch.Tensor) -> Decomposition:
        return decompose_pixels(self.vit, pixels, layers=self.layers, spatial=self.spatial,
                                precision=self.precision).to("cpu")


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
              workers: int | None = None, decode: str = "auto", draft: bool = False) -> Decomposition:
    """Decompose the image embeddings of ``images`` with ``model`` (a ClipModel).

    ``images``: image paths, bytes, PIL images, numpy arrays, or a preprocessed tensor
    [B, 3, H, W]. ``layers``: analysed layers (default: the last 4). ``spatial``: keep
    per-token head pieces. ``on_error``: ``"raise"`` or ``"skip"`` unreadable images
    (skipped ones are listed in ``Decomposition.failures``). ``precision``: compute
    precision (default: the model's). ``workers``, ``decode``, ``draft``: the input
    pipeline (``clip_interpret.pipeline``; default: worker processes from 64 images on).
    The model computes on its device; the result is on the CPU.
    """
    from .device import check_precision, is_out_of_memory, out_of_memory_error
    from .pipeline import ListSource, pixel_batches

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if batch_size < 1:
        raise ClipInterpretError(f"batch size must be at least 1, got {batch_size}")
    vit = model.vit if hasattr(model, "vit") else model
    device = vit.proj.device
    precision = check_precision(precision or getattr(model, "precision", "fp32"))
    chosen = resolve_layers(layers, vit.cfg.layers)
    compute = _Decompose(vit, chosen, spatial, precision)
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
    names = (*Decomposition.PIECES, "embedding") + (("head_tokens",) if first.spatial else ())
    tensors = {name: torch.cat([getattr(p, name) for p in parts]) for name in names}
    return Decomposition(**tensors, layers=first.layers, other_layers=first.other_layers, grid=first.grid,
                         image_size=first.image_size, precision=first.precision)
