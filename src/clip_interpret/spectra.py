"""Heads read from their weights: the singular directions of each head's value-output map (SITH,
arXiv 2603.24653), carried into the joint space and explained by sparse combinations of texts.

**The map.** Head h of layer l reads the LayerNormed stream ``LN1(x) = gamma1 * xhat + beta1`` and
writes, at every query position, ``W_O^h (sum_i A_i (W_V^h LN1(x_i) + b_V^h))`` (times LayerScale when
the tower has it). The attention pattern sums to one, so in row-vector form the write is

    o = xbar @ M_h + c_h,   M_h = diag(gamma1) W_V^h^T W_O^h^T   [width, width],  rank <= head_dim,
    xbar = sum_i A_i xhat_i,  c_h = (beta1 W_V^h^T + b_V^h) W_O^h^T   (a constant write).

Every write (the constant too) lies in the column space of W_O^h, which the right singular vectors of
``M_h`` span when ``k = head_dim`` (``residual``: the head's residual-stream directions).

**Into the joint space.** A CLS-pooled tower maps a residual piece r to the embedding by LN_post and
the projection: ``r -> (r - mean(r)) * gamma_post @ P / sigma``. The per-image scale ``sigma`` is the
one approximation (it is frozen in the exact decomposition, unknown without an image): it scales a
direction's magnitude, never its identity, so the directions are unit vectors and the singular values
are those of ``M_h @ T`` with ``T = C diag(gamma_post) P`` (C: the centring). An attention-pooled tower
(SigLIP's MAP head) carries r through LN_post at every token (each token's scale frozen, the same
approximation), the pooling head's values and output, ``T = C diag(gamma_post) W_V^pool^T W_O^pool^T
[P]``: exact when the pooling heads weigh the token alike (their patterns differ per image: the second
approximation); the pooling MLP is nonlinear and left out (the third). CoCa's attentional pooler adds the
pooled row's LayerNorm, its scale left out as LN_post's is: ``T = C diag(gamma_k) W_V^T W_O^T C diag(gamma) P``
(``coca_joint_map``).

**Directions.** The SVD of the carried map ``K_h = M_h T = U S V^T`` gives the joint-space directions
(rows of V^T, unit) with their singular values; the input direction u_j makes the head write the
residual vector ``u_j @ M_h`` (``write``: what ``edit_head`` scales to edit that direction).

**Explanations.** Each direction (either sign: a singular vector's sign is arbitrary) is fitted by a
non-negative combination of at most ``n_texts`` unit text embeddings of the pool (non-negative
orthogonal matching pursuit: the text most aligned with the residual joins, then NNLS on the chosen
texts). The texts are first centred (the pool's mean embedding removed, each renormalised: what
every text shares says nothing about a head; ``center=False`` keeps them as they are). ``fit`` is the cosine^2 between the direction and the combination (the share of the direction
it captures). A head's label is the pool category with the largest weight, each text weighing its
direction's singular value x fit x its share of the combination (the taxonomy labeller's vote).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .decompose import head_name, parse_head
from .errors import ClipInterpretError

DEFAULT_K = 5
DEFAULT_TEXTS = 5
SPECTRA_GLOB = "spectra-*.json"  # a run folder's spectra results (``spectra_file_name``)


def _value_output(vit, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head (layer, head)'s value-output map from the normalised input ``xhat``, float32 on the CPU:
    ``(v_in [width, d], w_out [d, width], constant [width])`` with ``M = v_in @ w_out`` and the head's
    write ``xbar @ M + constant``. The output side is the block's own output map (``out_weight()``:
    the projection's columns of the head, with LayerScale), as for the forward and the decomposition."""
    cfg = vit.cfg
    block = vit.blocks[layer]
    w, d = cfg.width, cfg.head_dim
    rows = slice(2 * w + head * d, 2 * w + (head + 1) * d)
    w_v = block.qkv.weight[rows].detach().float().cpu()  # [d, width]
    b_v = block.qkv.bias[rows].detach().float().cpu()
    if block.ln1 is not None:
        gamma, beta = block.ln1.weight.detach().float().cpu(), block.ln1.bias.detach().float().cpu()
    else:  # a post-norm block (EVA02-E): the head reads the stream itself
        gamma, beta = torch.ones(w), torch.zeros(w)
    w_o = block.out_weight()[:, head * d:(head + 1) * d].detach().float().cpu()  # [width, d]
    v_in = gamma[:, None] * w_v.T
    return v_in, w_o.T.contiguous(), (beta @ w_v.T + b_v) @ w_o.T


def joint_map(vit) -> torch.Tensor:
    """The linear map [width, D] carrying a residual piece into the joint space (module doc), float32."""
    gamma = vit.ln_post.weight.detach().float().cpu()
    proj = vit.proj.detach().float().cpu() if vit.proj is not None else None
    if vit.pool is None:
        g = gamma[:, None] * proj
        return g - g.mean(dim=0, keepdim=True)
    if vit.cfg.pool == "attn-pool":
        return coca_joint_map(vit, gamma, proj)
    w = vit.cfg.width
    pool = vit.pool
    value_in = gamma[:, None] * pool.kv.weight[w:].detach().float().cpu().T
    value_in = value_in - value_in.mean(dim=0, keepdim=True)
    out = pool.out.weight.detach().float().cpu().T
    carried = value_in @ out
    return carried @ proj if proj is not None else carried


def coca_joint_map(vit, gamma: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``joint_map`` of a CoCa tower: LN_k (centring, gamma), the pooler's values and output projection, then the
    pooled row's LayerNorm (centring, gamma) and the projection; the frozen scales left out, as above."""
    pool, e = vit.pool, vit.cfg.pool_width
    value_in = gamma[:, None] * pool.kv.weight[e:].detach().float().cpu().T
    value_in = value_in - value_in.mean(dim=0, keepdim=True)
    g = pool.ln.weight.detach().float().cpu()[:, None] * proj
    return value_in @ pool.out.weight.detach().float().cpu().T @ (g - g.mean(dim=0, keepdim=True))


@dataclass
class Explanation:
    """A sparse non-negative combination of pool texts that fits one direction (``sign`` x direction)."""

    indices: list[int]
    weights: list[float]
    sign: int
    fit: float  # cosine^2 between sign x direction and the combination


@dataclass
class HeadSpectrum:
    """One head's top singular directions: ``singular`` [k], ``directions`` [k, D] (joint space, unit),
    ``writes`` [k, width] (the residual vector the head writes for each, unit), ``residual`` [k, width]
    and ``residual_singular`` [k] (the SVD of the residual-stream map itself), their explanations,
    and the head's label."""

    name: str
    singular: torch.Tensor
    directions: torch.Tensor
    writes: torch.Tensor
    residual: torch.Tensor
    residual_singular: torch.Tensor
    explanations: list[Explanation] = field(default_factory=list)
    label: str | None = None
    confidence: float = 0.0


@dataclass
class Spectra:
    """``head_spectra``'s result: every head's spectrum, the pool, and what the run took."""

    heads: dict[str, HeadSpectrum]
    pool_name: str
    texts: list[str]
    categories: list[str | None]
    k: int
    n_texts: int
    model: str
    seconds: float = 0.0
    center: bool = True

    def labels(self) -> dict[str, str | None]:
        return {name: head.label for name, head in self.heads.items()}

    def to_json(self) -> dict:
        heads = {}
        for name, head in self.heads.items():
            directions = []
            for j, ex in enumerate(head.explanations):
                total = sum(ex.weights) or 1.0
                directions.append({
                    "singular": round(float(head.singular[j]), 6), "sign": ex.sign, "fit": round(ex.fit, 4),
                    "texts": [self.texts[i] for i in ex.indices],
                    "categories": [self.categories[i] for i in ex.indices],
                    "weights": [round(w / total, 4) for w in ex.weights]})
            heads[name] = {"label": head.label, "confidence": round(head.confidence, 4), "directions": directions}
        return {"model": self.model, "pool": {"name": self.pool_name, "size": len(self.texts)}, "k": self.k,
                "n_texts": self.n_texts, "center": self.center, "seconds": round(self.seconds, 3),
                "approximation": "LN_post's per-image scale (and, in an attention-pooled tower, each pooling "
                                 "head's pattern and the pooling MLP) are not in the map: directions are unit, "
                                 "singular values are up to that scale", "heads": heads}


def spectra_file_name(pool_spec: str) -> str:
    """The file a run folder keeps a pool's spectra in: ``spectra-toy.json``, ``spectra-general.json``,
    ``spectra-<file stem>.json`` (the naming of the run's TextSpan files)."""
    from .pools import pool_slug

    return f"spectra-{pool_slug(pool_spec)}.json"


def head_svd(vit, layer: int, head: int, k: int, carry: torch.Tensor | None = None) -> dict:
    """The top-k singular directions of one head (module doc), float64 arithmetic, float32 results."""
    v_in, w_out, _ = _value_output(vit, layer, head)
    carry = joint_map(vit) if carry is None else carry
    q, r = torch.linalg.qr(v_in.double())  # v_in = Q R: M = Q (R w_out); Q's columns orthonormal
    small = r @ w_out.double()  # [d, width]
    _, s_res, vh_res = torch.linalg.svd(small, full_matrices=False)
    u, s, vh = torch.linalg.svd(small @ carry.double(), full_matrices=False)
    k = min(k, s.shape[0])
    # the residual vector written for input direction Q u_j is u_j^T R w_out
    writes = u[:, :k].T @ small
    writes = writes / writes.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return {"singular": s[:k].float(), "directions": vh[:k].float(), "writes": writes.float(),
            "residual": vh_res[:k].float(), "residual_singular": s_res[:k].float()}


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    return nnls(a, b)[0]


def sparse_fit(direction, texts, n_texts: int = DEFAULT_TEXTS, tol: float = 1e-4) -> Explanation:
    """The best sparse non-negative combination of rows of ``texts`` [M, D] (unit text embeddings) for
    ``direction`` [D] or its negation: non-negative OMP with at most ``n_texts`` texts (module doc)."""
    v = np.asarray(direction, dtype=np.float64).ravel()
    e = np.asarray(texts, dtype=np.float64)
    if e.ndim != 2 or e.shape[1] != v.shape[0]:
        raise ClipInterpretError(f"text embeddings of shape {list(e.shape)} do not match a direction of size "
                                 f"{v.shape[0]}: use the same model's text embeddings")
    if n_texts < 1:
        raise ClipInterpretError(f"the number of texts per direction must be at least 1, got {n_texts}")
    v = v / max(np.linalg.norm(v), 1e-30)
    best = None
    for sign in (1, -1):
        target = sign * v
        chosen: list[int] = []
        weights = np.zeros(0)
        fit = 0.0
        residual = target.copy()
        for _ in range(min(n_texts, e.shape[0])):
            scores = e @ residual
            scores[chosen] = -np.inf
            pick = int(np.argmax(scores))
            if scores[pick] <= 1e-12:
                break
            trial = chosen + [pick]
            w = _nnls(e[trial].T, target)
            combo = w @ e[trial]
            norm = np.linalg.norm(combo)
            new_fit = float((combo @ target) ** 2 / norm ** 2) if norm > 0 and combo @ target > 0 else 0.0
            if new_fit < fit + tol:
                break
            chosen, weights, fit = trial, w, new_fit
            residual = target - combo
        keep = [i for i, w in enumerate(weights) if w > 0]
        candidate = Explanation([chosen[i] for i in keep], [float(weights[i]) for i in keep], sign, fit)
        if best is None or candidate.fit > best.fit:
            best = candidate
    return best


def _label(spectrum: HeadSpectrum, categories: list[str | None]) -> tuple[str | None, float]:
    from .labels.labellers import vote
    from .labels.store import normalise_property

    props, weights = [], []
    for j, ex in enumerate(spectrum.explanations):
        total = sum(ex.weights) or 1.0
        for i, w in zip(ex.indices, ex.weights):
            props.append(normalise_property(categories[i]) if categories[i] else None)
            weights.append(float(spectrum.singular[j]) * ex.fit * w / total)
    return vote(props, weights)


def centre_texts(emb: np.ndarray) -> np.ndarray:
    """The pool's text embeddings less their mean, renormalised: a pool's texts share a large common
    component (the same for every text, so no head direction is about it); without it a direction is
    fitted by what tells the texts apart."""
    centred = emb - emb.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    if emb.shape[0] < 2 or (norms <= 1e-12).any():
        raise ClipInterpretError("cannot centre the pool's text embeddings: the pool needs at least two different "
                                 "texts (or pass center=False / --no-center)")
    return (centred / norms).astype(np.float32)


def head_spectra(model, pool="toy", k: int = DEFAULT_K, n_texts: int = DEFAULT_TEXTS, layers="all",
                 heads=None, text_emb=None, center: bool = True) -> Spectra:
    """Every head's top-k singular directions in the joint space, each explained by at most ``n_texts``
    texts of ``pool`` (``toy``, ``general``, a pool file, or a ``pools.Pool``), and a label per head
    (the pool's categories; ``None`` for an untagged pool). No images. ``layers``: ``"all"`` (default)
    or as in ``decompose``; ``heads``: a selection of head names (default every head of those layers).
    ``text_emb``: the pool's unit text embeddings [M, D], when already computed. ``center``: fit the
    directions with the texts less the pool's mean text embedding (``centre_texts``; default)."""
    from .decompose import resolve_layers, select_heads
    from .pools import Pool, load_pool, text_embeddings

    if k < 1:
        raise ClipInterpretError(f"k (directions per head) must be at least 1, got {k}")
    vit = model.vit if hasattr(model, "vit") else model
    cfg = vit.cfg
    pool = pool if isinstance(pool, Pool) else load_pool(pool)
    start = time.perf_counter()
    emb = np.asarray(text_emb if text_emb is not None else text_embeddings(model, pool), dtype=np.float32)
    if emb.shape[0] != len(pool):
        raise ClipInterpretError(f"{emb.shape[0]} text embeddings for a pool of {len(pool)} texts")
    chosen_layers = resolve_layers(layers, cfg.layers)
    names = select_heads(heads, chosen_layers, cfg.heads)
    carry = joint_map(vit)
    if carry.shape[1] != emb.shape[1]:
        raise ClipInterpretError(f"the text embeddings have size {emb.shape[1]}, the image tower's joint space "
                                 f"{carry.shape[1]}: use the same model's text embeddings")
    fitted = centre_texts(emb) if center else emb
    result = {}
    for name in names:
        layer, h = parse_head(name)
        svd = head_svd(vit, layer, h, k, carry)
        spectrum = HeadSpectrum(name=head_name(layer, h), **svd)
        spectrum.explanations = [sparse_fit(d, fitted, n_texts) for d in svd["directions"].numpy()]
        spectrum.label, spectrum.confidence = _label(spectrum, pool.categories)
        result[spectrum.name] = spectrum
    return Spectra(result, pool.name, list(pool.texts), list(pool.categories), k, n_texts,
                   getattr(model, "spec", type(model).__name__), time.perf_counter() - start, center)


def format_spectra(spectra: Spectra, shown: int = 3) -> str:
    """A table per head: its label, then each direction's singular value, fit and leading texts."""
    lines = []
    for name, head in spectra.heads.items():
        lines.append(f"{name}  label: {head.label or '-'} ({head.confidence:.2f})")
        for j, ex in enumerate(head.explanations):
            total = sum(ex.weights) or 1.0
            order = sorted(range(len(ex.indices)), key=lambda i: -ex.weights[i])[:shown]
            texts = ", ".join(f"{spectra.texts[ex.indices[i]]} ({ex.weights[i] / total:.2f})" for i in order)
            lines.append(f"  {j + 1}  s={float(head.singular[j]):8.4f}  {'+' if ex.sign > 0 else '-'}  "
                         f"fit={ex.fit:.2f}  {texts or '-'}")
    return "\n".join(lines)


@torch.no_grad()
def edit_head(model, head, direction, scale: float):
    """A copy of ``model`` whose head ``head`` (``"L4.H2"``) writes the residual-stream ``direction``
    [width] scaled by ``scale`` (0 removes it, 2 doubles it); what the head writes orthogonally to it is
    unchanged. The head's slice of the output projection becomes ``diag(1/ls) (I + (scale-1) r r^T)
    diag(ls) W_O^h`` (r: the unit direction; ls: LayerScale, when the tower has it). ``direction`` may
    be a ``HeadSpectrum``'s ``writes[j]`` or ``residual[j]``. The original model is untouched."""
    vit = model.vit if hasattr(model, "vit") else model
    cfg = vit.cfg
    layer, h = parse_head(head)
    if not 0 <= layer < cfg.layers or not 0 <= h < cfg.heads:
        raise ClipInterpretError(f"head {head_name(layer, h)} does not exist: the model has layers "
                                 f"0-{cfg.layers - 1} and heads 0-{cfg.heads - 1}")
    r = torch.as_tensor(np.asarray(direction.detach().cpu() if torch.is_tensor(direction) else direction,
                                   dtype=np.float64)).ravel()
    if r.shape[0] != cfg.width:
        raise ClipInterpretError(f"the direction has {r.shape[0]} values; a residual-stream direction of this "
                                 f"model has {cfg.width} (the width): use a spectrum's writes[j] or residual[j]")
    if not math.isfinite(float(scale)):
        raise ClipInterpretError(f"scale must be a finite number, got {scale}")
    norm = float(r.norm())
    if not math.isfinite(norm) or norm == 0:
        raise ClipInterpretError("the direction is zero (or not finite): give a nonzero residual-stream vector")
    r = r / norm
    edited = copy.deepcopy(model)
    target = edited.vit if hasattr(edited, "vit") else edited
    block = target.blocks[layer]
    if not block.linear_output:
        raise ClipInterpretError(f"layer {layer} normalises its heads' output (a LayerNorm over the heads or a "
                                 "post-norm, EVA02): a head's write cannot be edited through its output projection")
    d = cfg.head_dim
    cols = slice(h * d, (h + 1) * d)
    w = block.out.weight[:, cols].double()
    r = r.to(w.device)
    if block.ls1 is not None:
        ls = block.ls1.double()
        if bool((ls == 0).any()):
            raise ClipInterpretError(f"layer {layer}'s LayerScale has zero entries: the head's write cannot be "
                                     "edited through its output projection")
        written = ls[:, None] * w
        written = written + (float(scale) - 1) * torch.outer(r, r @ written)
        new = written / ls[:, None]
    else:
        new = w + (float(scale) - 1) * torch.outer(r, r @ w)
    block.out.weight[:, cols] = new.to(block.out.weight.dtype)
    if hasattr(edited, "_fingerprint"):
        edited._fingerprint = None  # the weights changed
    return edited
