"""TextSpan (Gandelsman et al., arXiv 2310.05916): a text basis for each head.

The published steps, for one head with contributions C [K, D] over K images and
unit text embeddings T [M, D]:

1. project T onto the span of the top-``rank`` right singular vectors V_r of C;
2. centre C;
3. ``m`` times: pick the text whose projection of C has the largest variance,
   record it, remove C's component along it, and orthogonalise the remaining
   texts against it.

Here the same steps run exactly inside the rank-r subspace: with texts written
in coordinates ``A = T V_r^T`` [M, r] and the r x r covariance
``S = V_r Cc^T Cc V_r^T / (K-1)``, the variance of text j's projection is
``a_j^T S a_j``; removing a direction ``a`` is ``S <- P S P`` and
``A <- A - (A a / |a|^2) a^T`` with ``P = I - a a^T / |a|^2``. The component of C
outside the subspace never meets a text, so the picks and their order are the
published algorithm's, while the cost no longer grows with the number of
images after one Gram matrix (K x D^2) per head.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import ClipInterpretError


@dataclass
class TextSpanResult:
    """The m texts picked for one head, in order, with what each explains."""

    indices: list[int]
    texts: list[str]
    variance: list[float]  # variance of the head's (remaining) data along each picked direction
    explained: list[float]  # that variance as a share of the head's total variance
    rank: int
    total_variance: float
    coefficients: np.ndarray | None = field(default=None, repr=False)  # [K, m] per-image coefficients
    directions: np.ndarray | None = field(default=None, repr=False)  # [m, D] the picked (projected) directions
    mean: np.ndarray | None = field(default=None, repr=False)  # [D] the head's mean contribution

    def reconstruct(self, m: int | None = None) -> np.ndarray:
        """The head's contributions rebuilt from its mean and the first ``m`` picked texts [K, D]."""
        if self.coefficients is None:
            raise ClipInterpretError("this TextSpan result was computed without keeping the reconstruction")
        m = len(self.indices) if m is None else min(m, len(self.indices))
        return self.mean[None] + self.coefficients[:, :m] @ self.directions[:m]


def _clamp_rank(rank: int, k: int, d: int) -> int:
    limit = min(k, d)
    if rank < 1:
        raise ClipInterpretError(f"rank must be at least 1, got {rank}")
    if rank > limit:
        warnings.warn(f"TextSpan rank {rank} is larger than the data allows ({k} images x {d} dims); "
                      f"using rank {limit}", stacklevel=3)
        return limit
    return rank


def textspan(contributions: np.ndarray, text_embeddings: np.ndarray, texts: list[str], m: int = 5,
             rank: int = 80, keep_reconstruction: bool = False) -> TextSpanResult:
    """Run TextSpan for one head (exact, in the rank-r subspace; see the module doc)."""
    c = np.asarray(contributions, dtype=np.float32)
    t = np.asarray(text_embeddings, dtype=np.float64)
    k, d = c.shape
    if k < 2:
        raise ClipInterpretError(f"TextSpan needs at least 2 images, got {k}")
    if t.shape[0] != len(texts) or t.shape[1] != d:
        raise ClipInterpretError(f"text embeddings {t.shape} do not match {len(texts)} texts of dimension {d}")
    if m < 1:
        raise ClipInterpretError(f"m must be at least 1, got {m}")
    if len(texts) < m:
        raise ClipInterpretError(f"the description pool has {len(texts)} texts, fewer than m={m}")
    rank = _clamp_rank(rank, k, d)
    c64 = c.astype(np.float64)
    gram = c64.T @ c64  # uncentred, as the published SVD (float64: picks on near-ties stay stable)
    _, vecs = np.linalg.eigh(gram)
    basis = vecs[:, ::-1][:, :rank].T  # [r, D]: top right singular vectors of C
    mean = c.mean(axis=0).astype(np.float64)
    centred_gram = gram - k * np.outer(mean, mean)
    cov = basis @ centred_gram @ basis.T / (k - 1)  # [r, r]
    total = float(np.trace(centred_gram) / (k - 1))
    coords = t @ basis.T  # [M, r]
    x = (c64 - mean) @ basis.T if keep_reconstruction else None  # [K, r]
    picked, variances, coefs, dirs = [], [], [], []
    for _ in range(m):
        var = np.einsum("mr,mr->m", coords @ cov, coords)
        top = int(np.argmax(var))
        a = coords[top].copy()
        norm2 = float(a @ a)
        if norm2 <= 1e-12:
            break  # every remaining text lies in the removed directions
        picked.append(top)
        variances.append(float(var[top]) / norm2)
        proj = np.eye(len(a)) - np.outer(a, a) / norm2
        cov = proj @ cov @ proj
        coords = coords - np.outer(coords @ a, a) / norm2
        if x is not None:
            coef = x @ a / norm2
            x = x - np.outer(coef, a)
            coefs.append(coef)
            dirs.append(a @ basis)
    result = TextSpanResult(indices=picked, texts=[texts[i] for i in picked], variance=variances,
                            explained=[v / total if total > 0 else 0.0 for v in variances], rank=rank,
                            total_variance=total)
    if keep_reconstruction:
        result.coefficients = np.stack(coefs, axis=1) if coefs else np.zeros((k, 0))
        result.directions = np.stack(dirs) if dirs else np.zeros((0, d))
        result.mean = mean
    return result


def textspan_run(run, model, pool, m: int = 5, rank: int = 80, check_ms=(1, 3, 5, 10, 20), progress: bool = True):
    """TextSpan for every analysed head of a run; with ``check_ms``, the reconstruction check.

    Returns a JSON-ready dict: per head the picked texts (with categories and the
    variance each explains), the inputs it came from, and — when the run supports
    zero-shot tasks — accuracy with the analysed heads replaced by their
    reconstructions from the first m texts (other layers' attention and all MLPs
    mean-ablated), beside the full model's.
    """
    from tqdm import tqdm

    from .pools import text_embeddings

    if len(pool) < m:
        raise ClipInterpretError(f"pool {pool.name} has {len(pool)} descriptions, fewer than m={m}")
    texts_emb = text_embeddings(model, pool)
    check_ms = sorted(set(check_ms)) if check_ms else []
    depth = max([m, *check_ms])
    heads = {}
    recon = {k: None for k in [0, *check_ms]} if check_ms else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in tqdm(run.layers, desc="TextSpan", unit="layer", disable=not progress):
            for head in range(run.n_heads):
                data = run.heads(layer, head)
                result = textspan(data, texts_emb, pool.texts, m=depth, rank=rank, keep_reconstruction=bool(check_ms))
                heads[f"L{layer}.H{head}"] = {
                    "texts": result.texts[:m],
                    "categories": [pool.categories[i] for i in result.indices[:m]],
                    "indices": result.indices[:m],
                    "variance": result.variance[:m],
                    "explained": result.explained[:m],
                    "rank": result.rank,
                }
                for k in recon:
                    part = result.reconstruct(k)
                    recon[k] = part if recon[k] is None else recon[k] + part
    rank_warnings = sorted({str(w.message) for w in caught if "rank" in str(w.message)})
    for message in rank_warnings:
        warnings.warn(message, stacklevel=2)
    out = {
        "pool": {"name": pool.name, "hash": pool.content_hash(), "size": len(pool)},
        "m": m, "rank": rank,
        "run": {"fingerprint": run.manifest["model"]["fingerprint"], "source_hash": run.manifest["source"]["hash"],
                "n_images": len(run), "layers": run.layers},
        "heads": heads,
    }
    if check_ms:
        out["reconstruction"] = reconstruction_check(run, model, {k: v for k, v in recon.items()})
    return out


def reconstruction_check(run, model, head_sums: dict[int, np.ndarray]) -> dict | None:
    """Zero-shot accuracy with the analysed heads replaced by TextSpan reconstructions."""
    from .ablation import iter_rows, layer_parts, piece_means, zero_shot_tasks

    try:
        tasks = zero_shot_tasks(run, model)
    except ClipInterpretError as err:
        return {"skipped": str(err)}
    attn_mean, mlp_mean = piece_means(run)
    other = run.manifest["other_layers"]
    fixed_mean = mlp_mean.sum(axis=0) + (attn_mean[other].sum(axis=0) if other else 0)
    variants = {"full": None, **{f"m={k}" if k else "heads mean-ablated (m=0)": k for k in sorted(head_sums)}}
    correct = {name: np.zeros(len(tasks)) for name in variants}
    for start, rows in iter_rows(run):
        attn, mlps, heads, rest = layer_parts(rows, run)
        stop = start + rows.shape[0]
        bias = rows[:, slice(*run.layout["attn_bias"])].sum(axis=1)
        for name, k in variants.items():
            if k is None:
                emb = attn.sum(axis=1) + mlps.sum(axis=1) + rest
            else:
                emb = head_sums[k][start:stop] + bias + fixed_mean + rest
            for t, task in enumerate(tasks):
                correct[name][t] += ((emb @ task.classes.T).argmax(axis=1) == task.labels[start:stop]).sum()
    n = len(run)
    table = {name: {task.name: float(c[t] / n) for t, task in enumerate(tasks)} for name, c in correct.items()}
    for row in table.values():
        row["mean"] = float(np.mean([row[t.name] for t in tasks]))
    return {"tasks": [t.name for t in tasks], "chance": {t.name: 1.0 / len(t.class_names) for t in tasks},
            "accuracy": table, "n_images": n}


def format_heads(result: dict, width: int = 44) -> str:
    lines = [f"TextSpan, pool {result['pool']['name']} ({result['pool']['size']} texts), m={result['m']}, "
             f"rank {result['rank']}, {result['run']['n_images']} images"]
    for name, head in result["heads"].items():
        picks = "; ".join(f"{t[:width]} ({e:.0%})" for t, e in zip(head["texts"], head["explained"]))
        lines.append(f"  {name:<7} {picks}")
    return "\n".join(lines)
