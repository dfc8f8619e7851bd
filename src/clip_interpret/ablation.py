"""Zero-shot accuracy of reconstructed embeddings: the mean-ablation study.

Works on a run directory, streaming over its shards (memory stays flat). The
stored pieces live in the joint space, so "mean-ablating" a piece replaces it
by its mean over the run's images there. Variants:

* ``full``: the sum of every stored piece (the exact reconstruction);
* ``MLPs mean-ablated``: every block's MLP piece replaced by its mean;
* ``attention 0..k mean-ablated``: the whole attention output of layers 0..k
  (heads, bias, or the stored layer total) replaced by its mean, k = 0, 1, ...

Tasks: on a toy-world run, one task per toy property; on a run whose class
labels are ImageNet synsets or class names, ImageNet zero-shot with open_clip's
class names and templates; otherwise the folder class names with simple
templates. A CSV image table adds one task per labelled column (property),
its values as classes, with property templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .cluster import map_shards, one_session
from .errors import ClipInterpretError

SIMPLE_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.")
PROPERTY_TEMPLATES = ("a photo of {}.", "an image with {}.", "{}.")


@dataclass
class Task:
    name: str
    labels: np.ndarray  # [N] class index per run image
    classes: np.ndarray  # [C, D] unit class embeddings
    class_names: list[str]


def _class_embeddings(model, names: list[str], templates) -> np.ndarray:
    from .pools import Pool, text_embeddings

    texts = [t(name) if callable(t) else t.format(name) for name in names for t in templates]  # open_clip: lambdas
    emb = text_embeddings(model, Pool("classes", texts, [None] * len(texts)))
    emb = emb.reshape(len(names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def zero_shot_tasks(run, model) -> list[Task]:
    """The classification tasks a run supports (see the module doc)."""
    if run.manifest["source"]["kind"] == "toyworld":
        from .toyworld import PROPERTIES
        from .toyworld.evaluate import class_embeddings

        tasks = []
        for prop, values in PROPERTIES.items():
            labels = np.asarray([values.index(v) for v in run.labels[prop]])
            tasks.append(Task(prop, labels, class_embeddings(model, prop).cpu().numpy(), list(values)))
        return tasks
    property_sets = [k for k in run.labels if k != "class"]
    if "class" not in run.labels and not property_sets:
        raise ClipInterpretError(f"run {run.path} has no labels to classify: the mean-ablation study needs images "
                                 "in class sub-folders (ImageFolder layout), a CSV table of labelled images, "
                                 "or a toyworld source")
    tasks = [_property_task(model, prop, run.labels[prop]) for prop in property_sets]
    if "class" not in run.labels:
        return tasks
    return tasks + _class_tasks(run, model)


def _property_task(model, prop: str, values: list[str]) -> Task:
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    readable = [n.replace("_", " ") for n in names]
    return Task(prop, np.asarray([index[v] for v in values]), _class_embeddings(model, readable, PROPERTY_TEMPLATES),
                readable)


def _class_tasks(run, model) -> list[Task]:
    folder_labels = run.labels["class"]
    names = sorted(set(folder_labels))
    from open_clip import zero_shot_metadata as meta

    imagenet = list(meta.IMAGENET_CLASSNAMES)
    if all(re.fullmatch(r"n\d{8}", n) for n in names):
        synsets = _imagenet_synsets()
        if synsets is None or any(n not in synsets for n in names):
            raise ClipInterpretError("the run's class folders are WordNet synsets, but not all of them are "
                                     "ImageNet-1k classes")
        index = {s: i for i, s in enumerate(synsets)}
        return [_imagenet_task(model, [index[n] for n in folder_labels])]
    lowered = {c.lower(): i for i, c in enumerate(imagenet)}
    if all(n.replace("_", " ").lower() in lowered for n in names):
        return [_imagenet_task(model, [lowered[n.replace("_", " ").lower()] for n in folder_labels])]
    labels = np.asarray([names.index(n) for n in folder_labels])
    readable = [n.replace("_", " ") for n in names]
    return [Task("class", labels, _class_embeddings(model, readable, SIMPLE_TEMPLATES), readable)]


def _imagenet_task(model, class_indices: list[int]) -> Task:
    """ImageNet zero-shot over open_clip's class names, the images given by class index (0-999).

    open_clip's list names two pairs of classes alike ("missile": 657, 744; "sunglasses": 836, 837);
    their prompts, hence their embeddings, are identical, so a class index is mapped to its name's
    class: 998 classes, and an image of either synset of a pair counts as right when the model picks
    that name (with 1000 tied classes, one synset of each pair could never be predicted).
    """
    from open_clip import zero_shot_metadata as meta

    imagenet = list(meta.IMAGENET_CLASSNAMES)
    names = list(dict.fromkeys(imagenet))
    position = {name: i for i, name in enumerate(names)}
    labels = np.asarray([position[imagenet[i]] for i in class_indices])
    return Task("imagenet", labels, _class_embeddings(model, names, meta.SIMPLE_IMAGENET_TEMPLATES), names)


def _imagenet_synsets() -> list[str] | None:
    """ImageNet-1k synset ids in class order (the list timm ships; timm comes with open_clip)."""
    try:
        from importlib import resources

        text = resources.files("timm").joinpath("data/_info/imagenet_synsets.txt").read_text()
    except (ImportError, OSError, ModuleNotFoundError):
        return None
    synsets = [line.strip() for line in text.splitlines() if line.strip()]
    return synsets if len(synsets) == 1000 else None


def layer_parts(rows: torch.Tensor, run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shard rows [S, P, D] -> (attention per layer [S, L, D], MLP per layer [S, L, D],
    analysed heads [S, La, H, D], the rest [S, D]: token embedding + pooling MLP (attention-pooled
    towers) + constant)."""
    layout = run.layout
    s, _, d = rows.shape
    n_layers = run.manifest["n_layers"]
    heads = rows[:, slice(*layout["heads"])].reshape(s, len(run.layers), run.n_heads, d)
    bias = rows[:, slice(*layout["attn_bias"])]
    attn = rows.new_zeros((s, n_layers, d))
    attn[:, run.layers] = heads.sum(dim=2) + bias
    other = run.manifest["other_layers"]
    if other:
        attn[:, other] = rows[:, slice(*layout["other_attn"])]
    mlps = rows[:, slice(*layout["mlps"])]
    rest = sum(rows[:, slice(*layout[name])].sum(dim=1) for name in ("cls_embed", "pool_mlp", "constant")
               if name in layout)
    return attn, mlps, heads, rest


def iter_rows(run, device="cpu", positions=None):
    """(start index, rows [S, P, D] float32 on ``device``) per shard (one shard in memory at a time;
    ``positions``: only the shards at these indices into ``run.shards``)."""
    for start, pieces in run.iter_pieces(positions):
        yield start, torch.from_numpy(np.ascontiguousarray(pieces)).to(device).float()


def task_tensors(task: Task, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [N], classes [C, D]) of a task as tensors on ``device``."""
    return (torch.as_tensor(task.labels, device=device),
            torch.as_tensor(task.classes, dtype=torch.float32, device=device))


def _means_partial(run, positions, device):
    """Sums of every layer's attention and MLP pieces ([L, D] each, float64) and the row count."""
    n_layers, d = run.manifest["n_layers"], run.dim
    attn_sum = torch.zeros((n_layers, d), dtype=torch.float64, device=device)
    mlp_sum, n = torch.zeros_like(attn_sum), 0
    for _, rows in iter_rows(run, device, positions):
        attn, mlps, _, _ = layer_parts(rows, run)
        attn_sum += attn.sum(dim=0)
        mlp_sum += mlps.sum(dim=0)
        n += rows.shape[0]
    return attn_sum.cpu().numpy(), mlp_sum.cpu().numpy(), n


def piece_means(run, device="cpu", engine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset means of every layer's attention and MLP pieces ([L, D] each, float64 sums),
    on ``device``; ``engine``: see ``clip_interpret.cluster.map_shards``."""
    attn_sum, mlp_sum, n = map_shards(run, _means_partial, (), device, engine)
    if n == 0:
        raise ClipInterpretError(f"run {run.path} holds no images")
    return (torch.as_tensor(attn_sum / n, device=device).float(),
            torch.as_tensor(mlp_sum / n, device=device).float())


def _device(model, device):
    return torch.device(device) if device is not None else getattr(model, "device", torch.device("cpu"))


def _ablation_partial(run, positions, device, tasks, attn_mean, mlp_mean):
    """Correct predictions [variants, tasks] over the shards at ``positions`` (see ablation_study)."""
    on_device = [task_tensors(t, device) for t in tasks]
    attn_mean, mlp_mean = torch.as_tensor(attn_mean, device=device), torch.as_tensor(mlp_mean, device=device)
    n_layers = attn_mean.shape[0]
    correct = torch.zeros((2 + n_layers, len(on_device)), dtype=torch.float64, device=device)
    for start, rows in iter_rows(run, device, positions):
        attn, mlps, _, rest = layer_parts(rows, run)
        stop = start + rows.shape[0]
        attn_total, mlp_total = attn.sum(dim=1), mlps.sum(dim=1)
        embs = [attn_total + mlp_total + rest, attn_total + mlp_mean.sum(dim=0) + rest]
        for k in range(n_layers):
            embs.append(attn_mean[:k + 1].sum(dim=0) + attn[:, k + 1:].sum(dim=1) + mlp_total + rest)
        for v, emb in enumerate(embs):
            for t, (labels, classes) in enumerate(on_device):
                correct[v, t] += ((emb @ classes.T).argmax(dim=1) == labels[start:stop]).sum()
    return correct.cpu().numpy()


@one_session
def ablation_study(run, model, device=None, engine=None) -> dict:
    """Accuracy per task for the full reconstruction and each mean-ablation (see the module doc).
    Computed on ``device`` (default: the model's), one shard at a time; with ``engine="ray"``
    (or a ``cluster.Engine``), by Ray tasks over groups of shards."""
    device = _device(model, device)
    tasks = zero_shot_tasks(run, model)
    attn_mean, mlp_mean = piece_means(run, device, engine)
    n_layers = attn_mean.shape[0]
    variants = ["full", "MLPs mean-ablated"] + [
        f"attention 0-{k} mean-ablated" if k else "attention 0 mean-ablated" for k in range(n_layers)]
    correct = map_shards(run, _ablation_partial, (tasks, attn_mean.cpu().numpy(), mlp_mean.cpu().numpy()), device,
                         engine)
    n = len(run)
    table = {variant: {task.name: float(correct[v, t] / n) for t, task in enumerate(tasks)}
             for v, variant in enumerate(variants)}
    for variant in table:
        table[variant]["mean"] = float(np.mean([table[variant][t.name] for t in tasks]))
    return {"tasks": [t.name for t in tasks], "chance": {t.name: 1.0 / len(t.class_names) for t in tasks},
            "accuracy": table, "n_images": n}


def format_table(result: dict, title: str) -> str:
    tasks = result["tasks"] + ["mean"]
    width = max(len(v) for v in result["accuracy"]) + 2
    lines = [title, " " * width + "".join(f"{t[:10]:>11}" for t in tasks)]
    for variant, row in result["accuracy"].items():
        lines.append(f"{variant:<{width}}" + "".join(f"{row[t]:>10.1%} " for t in tasks))
    if "chance" in result:
        chance = result["chance"]
        lines.append(f"{'chance':<{width}}" + "".join(
            f"{chance[t]:>10.1%} " if t in chance else f"{np.mean(list(chance.values())):>10.1%} " for t in tasks))
    return "\n".join(lines)
