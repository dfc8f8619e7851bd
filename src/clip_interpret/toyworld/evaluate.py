"""Zero-shot accuracy per property and caption retrieval on held-out toy images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .world import PROPERTIES, generate

# Prompts per property: {v} is the value's wording. Several templates, averaged.
PROMPTS = {
    "shape": ["a photo of a {v}", "a {v}", "a picture of {v}s"],
    "color": ["a photo of a {v} shape", "a {v} object", "something {v}"],
    "size": ["a photo of a {v} shape", "{v} objects", "a {v} thing"],
    "count": ["a photo of {v}", "{v}"],
    "position": ["a photo of a shape {v}", "an object {v}", "{v}"],
    "background": ["a photo of a shape on a {v} background", "a {v} backdrop", "on a {v} background"],
    "pattern": ["a photo of a shape on a {v} background", "a {v} backdrop", "on a {v} background"],
}
WORDING = {
    "count": {"1": "one shape", "2": "two shapes", "3": "three shapes"},
    "position": {"top left": "in the top left", "top right": "in the top right", "bottom left": "in the bottom left",
                 "bottom right": "in the bottom right", "center": "in the center"},
    "pattern": {"plain": "plain", "stripes": "striped", "dots": "dotted", "checkers": "checkered", "noise": "noisy"},
}

HELD_OUT_SEED = 1  # training uses world seed 0


def class_prompts(prop: str) -> list[list[str]]:
    """For each value of ``prop`` (in PROPERTIES order), its prompts."""
    wording = WORDING.get(prop, {})
    return [[t.format(v=wording.get(value, value)) for t in PROMPTS[prop]] for value in PROPERTIES[prop]]


def class_embeddings(model, prop: str) -> torch.Tensor:
    """Unit class embeddings [n_values, D]: the mean of each value's prompt embeddings."""
    rows = []
    for prompts in class_prompts(prop):
        emb = model.encode_text(prompts).mean(dim=0)
        rows.append(emb / emb.norm())
    return torch.stack(rows)


def _batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]


def _caption(key: tuple[int, int]) -> str:
    return generate(key[1], seed=key[0]).caption


def captions(n: int, seed: int, workers: int | None = None) -> list[str]:
    """Captions of the first ``n`` images of world ``seed`` (rendered in ``workers`` processes)."""
    from ..pipeline import resolve_workers

    keys = [(seed, i) for i in range(n)]
    workers = resolve_workers(workers, n)
    if workers == 0:
        return [_caption(k) for k in keys]
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        return pool.map(_caption, keys, chunksize=64)


@dataclass
class _Forward:
    """Pixels -> unit embeddings [B, D], or every head's contribution [B, L, H, D] with ``heads``
    (picklable: on a CPU the workers that make the images run it)."""

    vit: torch.nn.Module
    precision: str
    heads: bool = False

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        from ..decompose import decompose_pixels

        d = decompose_pixels(self.vit, pixels, layers="all" if self.heads else None, precision=self.precision,
                             checked=True)  # the model's precision, checked when it was set
        return d.heads if self.heads else d.embedding


def toy_pixel_batches(model, n: int, seed: int, batch_size: int = 256, workers: int | None = None, compute=None):
    """The source ``toyworld:n:seed`` and its batches on the model's device (images made by the workers)."""
    from ..runstore import open_source
    from ..pipeline import pixel_batches

    source = open_source(f"toyworld:{n}:{seed}")
    return source, pixel_batches(source, model.preprocess, _batches(n, batch_size), model.device, workers=workers,
                                 compute=compute)


def heldout_embeddings(model, n: int = 1000, seed: int = HELD_OUT_SEED, batch_size: int = 256,
                       workers: int | None = None):
    """Unit image embeddings (CPU), attribute labels and captions of ``n`` held-out images."""
    compute = _Forward(model.vit, model.precision)
    source, stream = toy_pixel_batches(model, n, seed, batch_size, workers, compute)
    embs = torch.cat([batch.result(compute).cpu() for batch in stream])
    labels = {p: np.asarray([values.index(v) for v in source.labels[p]]) for p, values in PROPERTIES.items()}
    return embs, labels, captions(n, seed, workers)


def zero_shot(model, images: torch.Tensor, labels: dict[str, np.ndarray]) -> dict[str, dict]:
    """Accuracy per property, with chance level."""
    out = {}
    for prop in PROPERTIES:
        pred = (images @ class_embeddings(model, prop).T).argmax(dim=1).numpy()
        out[prop] = {"accuracy": float((pred == labels[prop]).mean()), "chance": 1.0 / len(PROPERTIES[prop]),
                     "classes": len(PROPERTIES[prop])}
    return out


def retrieval(model, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Image -> caption recall@1 and @5 over the given pairs (i-th image, i-th caption)."""
    texts = model.encode_text(captions)
    sims = images @ texts.T
    ranks = (sims > sims.diag()[:, None]).sum(dim=1)  # how many captions beat the right one
    return {"recall@1": float((ranks < 1).float().mean()), "recall@5": float((ranks < 5).float().mean()),
            "pairs": len(captions)}


def evaluate(model, n: int = 1000, seed: int = HELD_OUT_SEED, workers: int | None = None) -> dict:
    images, labels, texts = heldout_embeddings(model, n, seed, workers=workers)
    return {"zero_shot": zero_shot(model, images, labels), "retrieval": retrieval(model, images, texts),
            "n": n, "seed": seed}


def format_eval(result: dict) -> str:
    lines = [f"zero-shot accuracy on {result['n']} held-out images (world seed {result['seed']}):",
             f"  {'property':<11} {'accuracy':>9} {'chance':>8}"]
    for prop, r in result["zero_shot"].items():
        lines.append(f"  {prop:<11} {r['accuracy']:>8.1%} {r['chance']:>8.1%}")
    rr = result["retrieval"]
    lines.append(f"image->caption retrieval on {rr['pairs']} held-out pairs: "
                 f"recall@1 {rr['recall@1']:.1%}, recall@5 {rr['recall@5']:.1%}")
    return "\n".join(lines)


def head_property_effects(model, n: int = 500, seed: int = HELD_OUT_SEED, batch_size: int = 100,
                          workers: int | None = None) -> dict:
    """Each head's direct effect on the zero-shot margin of each property.

    For an image with true value ``y`` of property ``p``, the margin direction is
    ``c_p[y] - mean_v c_p[v]`` (class embeddings); a head's effect is the mean over
    images of its contribution dotted with that direction. Returns ``effects``
    [n_layers, n_heads, n_properties] and the property order.
    """
    device = model.device
    classes = {p: class_embeddings(model, p).to(device) for p in PROPERTIES}
    labels = {}
    compute = _Forward(model.vit, model.precision, heads=True)
    source, stream = toy_pixel_batches(model, n, seed, batch_size, workers, compute)
    for p, values in PROPERTIES.items():
        labels[p] = torch.tensor([values.index(v) for v in source.labels[p]], device=device)
    total = None
    for batch in stream:
        heads = batch.result(compute).to(device)  # [B, L, H, D]
        rows = torch.tensor(batch.indices, device=device)
        cols = []
        for p in PROPERTIES:
            c = classes[p]
            direction = c[labels[p][rows]] - c.mean(dim=0, keepdim=True)  # [B, D]
            cols.append(torch.einsum("blhd,bd->lh", heads, direction))
        part = torch.stack(cols, dim=-1)
        total = part if total is None else total + part
    return {"effects": (total / n).cpu().numpy(), "properties": list(PROPERTIES), "n": n, "seed": seed}


def format_effects(result: dict, top: int = 3) -> str:
    effects, props = result["effects"], result["properties"]
    n_layers, n_heads, _ = effects.shape
    lines = [f"heads with the largest direct effect on each property's zero-shot margin "
             f"({result['n']} held-out images):"]
    for k, prop in enumerate(props):
        flat = effects[..., k].reshape(-1)
        order = np.argsort(-flat)[:top]
        lines.append(f"  {prop:<11} " + ", ".join(f"L{i // n_heads}.H{i % n_heads} {flat[i]:+.3f}" for i in order))
    return "\n".join(lines)


# ------------------------------------------------------------- diagnosis
def _best_threshold_accuracy(values: np.ndarray, labels: np.ndarray) -> float:
    """The best accuracy of one threshold on ``values`` for a binary ``labels`` (either direction)."""
    order = np.argsort(values, kind="stable")
    v, y = values[order], labels[order].astype(bool)
    # predict "True" above position k: correct = (False at or below k) + (True above k)
    false_below = np.concatenate([[0], np.cumsum(~y)])
    true_above = y.sum() - np.concatenate([[0], np.cumsum(y)])
    cuts = np.concatenate([[True], v[1:] != v[:-1], [True]])  # cut only between distinct values
    correct = (false_below + true_above)[cuts]
    return float(max(correct.max(), len(y) - correct.min()) / len(y))


def size_baselines(n: int = 1000, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """How well size can be told by pixel counts alone: one threshold on the object pixels of the
    whole image (the amount of object colour, confounded with count and shape) or on one object's
    pixels (its own extent, what size means)."""
    total, single, large = [], [], []
    for i in range(n):
        item = generate(i, seed)
        total.append(item.masks.any(axis=0).sum())
        single.append(item.masks.sum(axis=(1, 2)).mean())
        large.append(item.attributes["size"] == "large")
    large = np.asarray(large)
    return {"object_pixels_of_image": _best_threshold_accuracy(np.asarray(total, float), large),
            "pixels_per_object": _best_threshold_accuracy(np.asarray(single, float), large), "n": n}


def diagnose(model, n_train: int = 3000, n: int = 1000, seed: int = HELD_OUT_SEED,
             workers: int | None = None) -> dict:
    """Why a property is or is not learned, per property: zero-shot accuracy; a linear probe's
    accuracy on the image embeddings (fitted on ``n_train`` images of the training world 0, tested
    on the ``n`` held-out ones): is the property in the image embedding at all; and the largest
    cosine between two of its class embeddings: does the text tower tell its values apart.
    Also the pixel-count baselines of size (``size_baselines``)."""
    from ..probe import fit_probe

    train_images, train_labels, _ = heldout_embeddings(model, n_train, seed=0, workers=workers)
    images, labels, _ = heldout_embeddings(model, n, seed=seed, workers=workers)
    out = {}
    for prop, values in PROPERTIES.items():
        classes = class_embeddings(model, prop)
        zero_shot = float(((images @ classes.T).argmax(dim=1).numpy() == labels[prop]).mean())
        predict = fit_probe(train_images.numpy(), train_labels[prop], len(values))
        probe = float((predict(images.numpy()) == labels[prop]).mean())
        cos = (classes @ classes.T).numpy()
        off = cos[~np.eye(len(values), dtype=bool)]
        out[prop] = {"zero_shot": zero_shot, "probe": probe, "text_max_cos": float(off.max()),
                     "chance": 1.0 / len(values), "verdict": _verdict(zero_shot, probe, float(off.max()))}
    return {"properties": out, "size_baselines": size_baselines(n, seed), "n_train": n_train, "n": n,
            "seed": seed}


def _verdict(zero_shot: float, probe: float, text_max_cos: float) -> str:
    if zero_shot >= 0.95:
        return "learned"
    notes = []
    if probe < 0.9:
        notes.append("not (fully) in the image embedding")
    if text_max_cos > 0.98:
        notes.append("the text tower does not tell its values apart")
    return "; ".join(notes) or "both towers have it, not aligned"


def format_diagnosis(result: dict) -> str:
    lines = [f"why each property is learned or not ({result['n']} held-out images; probe fitted on "
             f"{result['n_train']} training-world images):",
             f"  {'property':<11} {'zero-shot':>9} {'probe':>7} {'chance':>7} {'text cos':>9}  verdict"]
    for prop, r in result["properties"].items():
        lines.append(f"  {prop:<11} {r['zero_shot']:>8.1%} {r['probe']:>7.1%} {r['chance']:>7.1%} "
                     f"{r['text_max_cos']:>9.3f}  {r['verdict']}")
    b = result["size_baselines"]
    lines.append(f"size from pixel counts alone, one threshold: object pixels of the image {b['object_pixels_of_image']:.1%} "
                 f"(confounded with count and shape), pixels per object {b['pixels_per_object']:.1%}")
    return "\n".join(lines)
