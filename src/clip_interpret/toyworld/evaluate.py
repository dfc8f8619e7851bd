"""Zero-shot accuracy per property and caption retrieval on held-out toy images."""

from __future__ import annotations

import numpy as np
import torch

from .world import PROPERTIES, ToyWorld

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


def heldout_embeddings(model, n: int = 1000, seed: int = HELD_OUT_SEED, batch_size: int = 256):
    """Unit image embeddings, attribute labels and captions of ``n`` held-out images."""
    world = ToyWorld(n, seed)
    embs, labels, captions = [], {p: [] for p in PROPERTIES}, []
    for start in range(0, n, batch_size):
        items = [world[i] for i in range(start, min(n, start + batch_size))]
        embs.append(model.encode_image(model.preprocess.batch([it.image for it in items])))
        for it in items:
            captions.append(it.caption)
            for p, values in PROPERTIES.items():
                labels[p].append(values.index(it.attributes[p]))
    return torch.cat(embs), {p: np.asarray(v) for p, v in labels.items()}, captions


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


def evaluate(model, n: int = 1000, seed: int = HELD_OUT_SEED) -> dict:
    images, labels, captions = heldout_embeddings(model, n, seed)
    return {"zero_shot": zero_shot(model, images, labels), "retrieval": retrieval(model, images, captions),
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


def head_property_effects(model, n: int = 500, seed: int = HELD_OUT_SEED, batch_size: int = 100) -> dict:
    """Each head's direct effect on the zero-shot margin of each property.

    For an image with true value ``y`` of property ``p``, the margin direction is
    ``c_p[y] - mean_v c_p[v]`` (class embeddings); a head's effect is the mean over
    images of its contribution dotted with that direction. Returns ``effects``
    [n_layers, n_heads, n_properties] and the property order.
    """
    from ..decompose import decompose

    world = ToyWorld(n, seed)
    classes = {p: class_embeddings(model, p) for p in PROPERTIES}
    total = None
    for start in range(0, n, batch_size):
        items = [world[i] for i in range(start, min(n, start + batch_size))]
        d = decompose(model, model.preprocess.batch([it.image for it in items]), layers="all")
        heads = d.heads  # [B, L, H, D]
        cols = []
        for p, values in PROPERTIES.items():
            c = classes[p]
            y = torch.tensor([values.index(it.attributes[p]) for it in items])
            direction = c[y] - c.mean(dim=0, keepdim=True)  # [B, D]
            cols.append(torch.einsum("blhd,bd->lh", heads, direction))
        part = torch.stack(cols, dim=-1)
        total = part if total is None else total + part
    return {"effects": (total / n).numpy(), "properties": list(PROPERTIES), "n": n, "seed": seed}


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
