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

from .engine import map_shards, one_session
from .errors import ClipInterpretError


@dataclass
class TextSpanResult:
    """The m texts picked for one head, in order, with what each explains.

    The reconstruction is linear: an image's coefficients along the picked directions
    are ``(c - mean) @ projection``, and ``mean + coefficients[:, :m] @ directions[:m]``
    rebuilds the head's contribution from its first m texts (for any data, streamed).
    """

    indices: list[int]
    texts: list[str]
    variance: list[float]  # variance of the head's (remaining) data along each picked direction
    explained: list[float]  # that variance as a share of the head's total variance
    rank: int
    total_variance: float
    mean: np.ndarray | None = field(default=None, repr=False)  # [D] the head's mean contribution
    projection: np.ndarray | None = field(default=None, repr=False)  # [D, m] centred contribution -> coefficients
    directions: np.ndarray | None = field(default=None, repr=False)  # [m, D] the picked (projected) directions
    coefficients: np.ndarray | None = field(default=None, repr=False)  # [K, m] of the data given to textspan()

    def reconstruct(self, m: int | None = None, data: np.ndarray | None = None) -> np.ndarray:
        """The head's contributions rebuilt from its mean and the first ``m`` picked texts [K, D]
        (of ``data`` [K, D], or of the data given to ``textspan(..., keep_reconstruction=True)``)."""
        m = len(self.indices) if m is None else min(m, len(self.indices))
        if data is not None:
            coefficients = (np.asarray(data, np.float64) - self.mean) @ self.projection
        elif self.coefficients is not None:
            coefficients = self.coefficients
        else:
            raise ClipInterpretError("this TextSpan result was computed without keeping the reconstruction; "
                                     "pass the head's data")
        return self.mean[None] + coefficients[:, :m] @ self.directions[:m]


def _clamp_rank(rank: int, k: int, d: int) -> int:
    limit = min(k, d)
    if rank < 1:
        raise ClipInterpretError(f"rank must be at least 1, got {rank}")
    if rank > limit:
        warnings.warn(f"TextSpan rank {rank} is larger than the data allows ({k} images x {d} dims); "
                      f"using rank {limit}", stacklevel=3)
        return limit
    return rank


def _check(k: int, d: int, text_embeddings: np.ndarray, texts: list[str], m: int) -> None:
    if k < 2:
        raise ClipInterpretError(f"TextSpan needs at least 2 images, got {k}")
    if text_embeddings.shape[0] != len(texts) or text_embeddings.shape[1] != d:
        raise ClipInterpretError(f"text embeddings {text_embeddings.shape} do not match {len(texts)} texts of "
                                 f"dimension {d}")
    if m < 1:
        raise ClipInterpretError(f"m must be at least 1, got {m}")
    if len(texts) < m:
        raise ClipInterpretError(f"the description pool has {len(texts)} texts, fewer than m={m}")


def textspan_from_gram(gram: np.ndarray, mean: np.ndarray, k: int, text_embeddings: np.ndarray, texts: list[str],
                       m: int = 5, rank: int = 80) -> TextSpanResult:
    """TextSpan for one head from its statistics alone: the uncentred Gram matrix ``C^T C`` [D, D]
    and the mean [D] of its contributions over ``k`` images (exact; see the module doc). Memory
    and time do not depend on ``k``, so the statistics can be accumulated shard by shard."""
    gram = np.asarray(gram, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    t = np.asarray(text_embeddings, dtype=np.float64)
    d = gram.shape[0]
    _check(k, d, t, texts, m)
    rank = _clamp_rank(rank, k, d)
    _, vecs = np.linalg.eigh(gram)
    basis = vecs[:, ::-1][:, :rank].T  # [r, D]: top right singular vectors of C
    centred_gram = gram - k * np.outer(mean, mean)
    cov = basis @ centred_gram @ basis.T / (k - 1)  # [r, r]
    total = float(np.trace(centred_gram) / (k - 1))
    coords = t @ basis.T  # [M, r]
    deflate = np.eye(rank)  # rows: the remaining part of each basis coordinate (coefficients are linear)
    picked, variances, weights, dirs = [], [], [], []
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
        w = deflate @ a / norm2
        deflate = deflate - np.outer(w, a)
        weights.append(w)
        dirs.append(a @ basis)
    return TextSpanResult(
        indices=picked, texts=[texts[i] for i in picked], variance=variances,
        explained=[v / total if total > 0 else 0.0 for v in variances], rank=rank, total_variance=total,
        mean=mean, projection=basis.T @ np.stack(weights, axis=1) if weights else np.zeros((d, 0)),
        directions=np.stack(dirs) if dirs else np.zeros((0, d)))


def textspan(contributions: np.ndarray, text_embeddings: np.ndarray, texts: list[str], m: int = 5,
             rank: int = 80, keep_reconstruction: bool = False) -> TextSpanResult:
    """Run TextSpan for one head with contributions [K, D] (exact, in the rank-r subspace)."""
    c = np.asarray(contributions, dtype=np.float32)
    c64 = c.astype(np.float64)
    gram = c64.T @ c64  # uncentred, as the published SVD (float64: picks on near-ties stay stable)
    result = textspan_from_gram(gram, c.mean(axis=0), c.shape[0], text_embeddings, texts, m, rank)
    if keep_reconstruction:
        result.coefficients = (c64 - result.mean) @ result.projection
    return result


def _gram_partial(run, positions, device, first: int, last: int):
    """Gram matrices [G, D, D] and sums [G, D] (float64, on the host) of the analysed heads
    first..last-1 over the shards at ``positions``."""
    import torch


    start_h, d = run.layout["heads"][0], run.dim
    grams = torch.zeros((last - first, d, d), dtype=torch.float64, device=device)
    sums = torch.zeros((last - first, d), dtype=torch.float64, device=device)
    for _, rows in run.iter_rows(device, positions):
        h = rows[:, start_h + first:start_h + last].double().transpose(0, 1)  # [G, S, D]
        grams += h.transpose(1, 2) @ h
        sums += h.sum(dim=1)
    return grams.cpu().numpy(), sums.cpu().numpy()


def head_statistics(run, device="cpu", max_bytes: int = 1 << 30, progress: bool = False, engine=None):
    """Per analysed head, the Gram matrix ``C^T C`` [D, D] and the sum of its contributions [D]
    (float64), accumulated shard by shard on ``device``: memory stays at the statistics' size
    (heads are taken in groups of at most ``max_bytes`` of Gram matrices, one pass per group),
    whatever the number of images. With ``engine="ray"`` (or an ``engine.Engine``) each pass is
    a map over groups of shards on Ray and a reduce (the sum). Yields (head index, gram, sum)."""
    from tqdm import tqdm

    start_h, stop_h = run.layout["heads"]
    n_heads, d = stop_h - start_h, run.dim
    group = max(1, min(n_heads, int(max_bytes // (d * d * 8))))
    passes = range(0, n_heads, group)
    for first in tqdm(passes, desc="TextSpan statistics", unit="pass", disable=not progress or len(passes) < 2):
        last = min(n_heads, first + group)
        grams, sums = map_shards(run, _gram_partial, (first, last), device, engine)
        for j in range(last - first):
            yield first + j, grams[j], sums[j]


@one_session
def textspan_run(run, model, pool, m: int = 5, rank: int = 80, check_ms=(1, 3, 5, 10, 20), progress: bool = True,
                 device=None, engine=None):
    """TextSpan for every analysed head of a run; with ``check_ms``, the reconstruction check.

    Streams the run: each head's Gram matrix and mean are accumulated shard by shard on
    ``device`` (default: the model's), so memory does not grow with the number of images;
    ``engine="ray"``: on Ray, a map over groups of shards and a reduce (``head_statistics``).
    Returns a JSON-ready dict: per head the picked texts (with categories and the
    variance each explains), the inputs it came from, and — when the run supports
    zero-shot tasks — accuracy with the analysed heads replaced by their
    reconstructions from the first m texts (other layers' attention and all MLPs
    mean-ablated), beside the full model's.
    """
    from tqdm import tqdm

    from .device import compute_device
    from .pools import text_embeddings

    if len(pool) < m:
        raise ClipInterpretError(f"pool {pool.name} has {len(pool)} descriptions, fewer than m={m}")
    device = compute_device(model, device)
    texts_emb = text_embeddings(model, pool)
    check_ms = sorted(set(check_ms)) if check_ms else []
    depth = max([m, *check_ms])
    names = run.head_names()
    n = len(run)
    heads, results = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bar = tqdm(total=len(names), desc="TextSpan", unit="head", disable=not progress)
        for index, gram, total in head_statistics(run, device, progress=progress, engine=engine):
            result = textspan_from_gram(gram, total / max(n, 1), n, texts_emb, pool.texts, m=depth, rank=rank)
            results[names[index]] = result
            heads[names[index]] = {
                "texts": result.texts[:m],
                "categories": [pool.categories[i] for i in result.indices[:m]],
                "indices": result.indices[:m],
                "variance": result.variance[:m],
                "explained": result.explained[:m],
                "rank": result.rank,
            }
            bar.update(1)
        bar.close()
    rank_warnings = sorted({str(w.message) for w in caught if "rank" in str(w.message)})
    for message in rank_warnings:
        warnings.warn(message, stacklevel=2)
    out = {
        "pool": {"name": pool.name, "hash": pool.content_hash(), "size": len(pool)},
        "m": m, "rank": rank,
        "run": {**run.stamp(),
                "n_images": n, "layers": run.layers},
        "heads": heads,
    }
    if check_ms:
        out["reconstruction"] = reconstruction_check(run, model, [results[name] for name in names], check_ms, device,
                                                     engine)
    return out


def _reconstruction_partial(run, positions, device, tasks, fixed_mean, means, projections, directions, ks):
    """Correct predictions [variants, tasks] over the shards at ``positions``: the full
    reconstruction, then the heads rebuilt from their first k texts for each k in ``ks``."""
    import torch

    from .zeroshot import task_tensors

    on_device = [task_tensors(t, device) for t in tasks]
    f32 = dict(dtype=torch.float32, device=device)
    fixed_mean, means = torch.as_tensor(fixed_mean, **f32), torch.as_tensor(means, **f32)
    projections, directions = torch.as_tensor(projections, **f32), torch.as_tensor(directions, **f32)
    correct = torch.zeros((1 + len(ks), len(tasks)), dtype=torch.float64, device=device)
    start_h, stop_h = run.layout["heads"]
    for start, rows in run.iter_rows(device, positions):
        attn, mlps, _, rest = run.layer_parts(rows)
        stop = start + rows.shape[0]
        bias = rows[:, slice(*run.layout["attn_bias"])].sum(dim=1)
        coefficients = torch.einsum("shd,hdm->shm", rows[:, start_h:stop_h] - means, projections)  # [S, HH, depth]
        embs = [attn.sum(dim=1) + mlps.sum(dim=1) + rest]
        for k in ks:
            heads = means.sum(dim=0) + torch.einsum("shm,hmd->sd", coefficients[..., :k], directions[:, :k])
            embs.append(heads + bias + fixed_mean + rest)
        for v, emb in enumerate(embs):
            for t, (labels, classes) in enumerate(on_device):
                correct[v, t] += ((emb @ classes.T).argmax(dim=1) == labels[start:stop]).sum()
    return correct.cpu().numpy()


def reconstruction_check(run, model, results: list[TextSpanResult], check_ms, device=None, engine=None) -> dict | None:
    """Zero-shot accuracy with the analysed heads replaced by TextSpan reconstructions from their
    first m texts (``results`` in the run's head order), other layers and MLPs mean-ablated."""
    from .ablation import piece_means
    from .device import compute_device
    from .zeroshot import zero_shot_tasks
    try:
        tasks = zero_shot_tasks(run, model)
    except ClipInterpretError as err:
        return {"skipped": str(err)}
    device = compute_device(model, device)
    attn_mean, mlp_mean = piece_means(run, device, engine)
    other = run.other_layers
    fixed_mean = mlp_mean.sum(dim=0) + (attn_mean[other].sum(dim=0) if other else 0)
    depth = max(check_ms)

    def padded(array, shape):  # heads that stopped early (no text left) get zero columns
        out = np.zeros(shape)
        out[tuple(slice(0, s) for s in array.shape)] = array
        return out

    d = run.dim
    means = np.stack([r.mean for r in results])  # [HH, D]
    projections = np.stack([padded(r.projection[:, :depth], (d, depth)) for r in results])
    directions = np.stack([padded(r.directions[:depth], (depth, d)) for r in results])
    ks = [0, *check_ms]
    correct = map_shards(run, _reconstruction_partial, (tasks, fixed_mean.cpu().numpy(), means, projections,
                                                        directions, ks), device, engine)
    variants = ["full"] + [f"m={k}" if k else "heads mean-ablated (m=0)" for k in ks]
    n = len(run)
    table = {name: {task.name: float(correct[v, t] / n) for t, task in enumerate(tasks)}
             for v, name in enumerate(variants)}
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
