"""Zero-shot classification tasks of a run: which labels it has, their class embeddings.

On a toy-world run, one task per toy property (the world's prompts); on a run whose
class labels are ImageNet synsets or class names, ImageNet zero-shot with open_clip's
class names and templates; otherwise the folder class names with simple templates. A
CSV image table adds one task per labelled column (property), its values as classes,
with property templates. Used by the mean-ablation study, effects, faithfulness,
TextSpan's reconstruction check and segbench.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ClipInterpretError

SIMPLE_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.")
PROPERTY_TEMPLATES = ("a photo of {}.", "an image with {}.", "{}.")


@dataclass
class Task:
    name: str
    labels: np.ndarray  # [N] class index per run image
    classes: np.ndarray  # [C, D] unit class embeddings
    class_names: list[str]


def class_embeddings(model, names: list[str], templates) -> np.ndarray:
    """Unit class embeddings [C, D]: the mean over ``templates`` of each name's text embedding."""
    from .pools import Pool, text_embeddings

    texts = [t(name) if callable(t) else t.format(name) for name in names for t in templates]  # open_clip: lambdas
    emb = text_embeddings(model, Pool("classes", texts, [None] * len(texts)))
    emb = emb.reshape(len(names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def zero_shot_tasks(run, model) -> list[Task]:
    """The classification tasks a run supports (see the module doc)."""
    if run.source_kind == "toyworld":
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
    return Task(prop, np.asarray([index[v] for v in values]), class_embeddings(model, readable, PROPERTY_TEMPLATES),
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
    return [Task("class", labels, class_embeddings(model, readable, SIMPLE_TEMPLATES), readable)]


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
    return Task("imagenet", labels, class_embeddings(model, names, meta.SIMPLE_IMAGENET_TEMPLATES), names)


def _imagenet_synsets() -> list[str] | None:
    """ImageNet-1k synset ids in class order (the list timm ships; timm comes with open_clip)."""
    try:
        from importlib import resources

        text = resources.files("timm").joinpath("data/_info/imagenet_synsets.txt").read_text()
    except (ImportError, OSError, ModuleNotFoundError):
        return None
    synsets = [line.strip() for line in text.splitlines() if line.strip()]
    return synsets if len(synsets) == 1000 else None


def task_tensors(task: Task, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [N], classes [C, D]) of a task as tensors on ``device``."""
    return (torch.as_tensor(task.labels, device=device),
            torch.as_tensor(task.classes, dtype=torch.float32, device=device))
