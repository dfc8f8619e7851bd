"""Zero-shot segmentation benchmark: maps from the decomposition, scored by the published protocol.

Maps (arXiv 2310.05916, section 5, and its evaluation script ``compute_segmentations.py``):
the model classifies the image zero-shot; each patch token's contribution to the
image embedding, summed over the analysed layers and their heads, is dotted with
the predicted class's text embedding minus the mean of all class embeddings
(the patch's score for that class minus its mean score over the classes); the
patch grid is upsampled bilinearly to the input size. Binarisation and scores,
as the script does them, per image:

    R = clip(map, 0, max); R = (R - min R) / (max R - min R)
    foreground = R > mean(R)                       (a constant map: all background)
    pixel accuracy = sum_images correct pixels / sum_images pixels
    mIoU = mean over {background, foreground} of sum_images |pred ∩ gt| / sum_images |pred ∪ gt|
    mAP  = mean over images of AP([1 - R, R] against [gt = background, gt = foreground])

(AP as scikit-learn's ``average_precision_score``; the ground truth is resized to
the input size with nearest-neighbour resampling, as the script does.) **Chance**:
the same maps scored against another image's ground truth (image i's map against
image i-1's mask), which keeps the maps' statistics and any dataset-wide prior
such as a centre bias, and removes only what the map knows of its own image.

Datasets: ``toyworld:N[:seed]`` (ground truth from the world's object masks: the
objects for shape, colour, size, count and position, the background for
background and pattern; one map per property, from that property's zero-shot
classes; and one map per head, so the heads that localise best are found), and
``imagenet-seg:PATH`` (``gtsegs_ijcv.mat`` of the ImageNet-Segmentation benchmark,
4,276 images; a MATLAB v7.3 file, read with h5py exactly as the published
script reads it; ImageNet zero-shot with OpenAI's 80 templates).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ClipInterpretError

PUBLISHED = {
    "dataset": "ImageNet-Segmentation (gtsegs_ijcv.mat, 4,276 images)",
    "method": "decomposition over image tokens (Gandelsman, Efros, Steinhardt; ICLR 2024, arXiv 2310.05916)",
    "pixel_accuracy": 75.21, "miou": 54.50, "map": 81.61,
    "model": ("not named beside these figures in the sources checked; the authors' evaluation script "
              "(compute_segmentations.py) defaults to open_clip ViT-H-14 / laion2b_s32b_b79k"),
}
OBJECT_PROPERTIES = ("shape", "color", "size", "count", "position")  # carried by the objects; the rest by the ground
METRICS = ("pixel_accuracy", "miou", "map")


# ------------------------------------------------------------------ datasets
class ToySegmentation:
    """Toy-world images with their ground truth: one mask per property (objects or background)."""

    kind = "toyworld"

    def __init__(self, spec: str):
        from .toyworld import PROPERTIES, ToyWorld

        self.world = ToyWorld.from_source(spec)
        self.spec = spec
        self.tasks = list(PROPERTIES)

    def __len__(self) -> int:
        return len(self.world)

    def load(self, i: int):
        return self.world[i].image

    def name(self, i: int) -> str:
        return f"toyworld:{self.world.seed}:{self.world.offset + i}"

    def targets(self, i: int) -> np.ndarray:
        """[tasks, H, W] bool: the pixels that carry each property."""
        objects = self.world[i].masks.any(axis=0)
        return np.stack([objects if t in OBJECT_PROPERTIES else ~objects for t in self.tasks])


class ImagenetSegmentation:
    """``gtsegs_ijcv.mat``: a MATLAB v7.3 (HDF5) file whose ``/value/img`` and ``/value/gt`` hold, per
    image, a reference to the image ([3, W, H] uint8) and a reference to a 1x1 cell referring to
    its mask ([W, H]); both are transposed to [H, W(, 3)] as the published reader does."""

    kind = "imagenet-seg"
    tasks = ["imagenet"]

    def __init__(self, path: str, limit: int | None = None):
        self.path = str(Path(path).expanduser())
        self._file = None
        handle = self._open()
        try:
            n_img, n_gt = len(handle["/value/img"]), len(handle["/value/gt"])
        finally:
            handle.close()
        if n_img != n_gt:
            raise ClipInterpretError(f"{self.path}: /value/img has {n_img} entries but /value/gt {n_gt}; "
                                     "this is not the ImageNet-Segmentation file")
        self.n = n_img if limit is None else min(int(limit), n_img)
        self.spec = f"imagenet-seg:{self.path}"

    def _open(self):
        try:
            import h5py
        except ImportError:
            raise ClipInterpretError("reading gtsegs_ijcv.mat needs h5py: pip install 'clip-interpret[segbench]'") \
                from None
        if not Path(self.path).is_file():
            raise ClipInterpretError(f"ImageNet-Segmentation file not found: {self.path} (the benchmark's "
                                     "gtsegs_ijcv.mat)")
        try:
            handle = h5py.File(self.path, "r")
        except OSError:
            raise ClipInterpretError(f"{self.path} is not a MATLAB v7.3 (HDF5) file; the ImageNet-Segmentation "
                                     "benchmark's gtsegs_ijcv.mat is one") from None
        missing = [key for key in ("/value/img", "/value/gt") if key not in handle]
        if missing:
            handle.close()
            raise ClipInterpretError(f"{self.path} has no {' or '.join(missing)}: it is not the "
                                     "ImageNet-Segmentation gtsegs_ijcv.mat")
        return handle

    def __getstate__(self):  # an open HDF5 handle does not cross processes; each opens its own
        return {**self.__dict__, "_file": None}

    @property
    def file(self):
        if self._file is None:
            self._file = self._open()
        return self._file

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> Image.Image:
        data = np.array(self.file[self.file["/value/img"][i, 0]])
        data = data.transpose((2, 1, 0)) if data.ndim == 3 else data.T
        return Image.fromarray(data).convert("RGB")

    def name(self, i: int) -> str:
        return f"{Path(self.path).name}[{i}]"

    def targets(self, i: int) -> np.ndarray:
        cell = self.file[self.file["/value/gt"][i, 0]]
        mask = np.array(self.file[cell[0, 0]]).T
        return (mask > 0)[None]


def open_dataset(spec: str, limit: int | None = None):
    """``toyworld:N[:seed]`` or ``imagenet-seg:PATH``."""
    if spec.startswith("toyworld:"):
        return ToySegmentation(spec)
    if spec.startswith("imagenet-seg:"):
        return ImagenetSegmentation(spec[len("imagenet-seg:"):], limit=limit)
    raise ClipInterpretError(f"unknown segmentation dataset {spec!r}; use toyworld:N[:seed] or "
                             "imagenet-seg:PATH (the benchmark's gtsegs_ijcv.mat)")


# ------------------------------------------------------------------- maps
@dataclass
class _SegMaps:
    """Pixels -> patch-grid maps [B, tasks, 1 + heads, gh, gw] (the total, then each head; per head
    only when ``per_head``) of the predicted class's score minus the mean class score, and the
    predicted classes [B, tasks]. Picklable: on a CPU the reading workers run it."""

    vit: torch.nn.Module
    layers: list[int]
    precision: str
    classes: list[torch.Tensor]  # per task [C, D] unit class embeddings
    per_head: bool

    def __call__(self, pixels: torch.Tensor) -> dict:
        from .decompose import decompose_pixels

        d = decompose_pixels(self.vit, pixels, layers=self.layers, spatial=True, precision=self.precision,
                             checked=True)  # the model's precision, checked when it was set
        tokens = d.head_tokens[:, :, 1:] if d.class_token else d.head_tokens  # [B, L, P, H, D]: patches only
        maps, chosen = [], []
        for classes in self.classes:
            classes = classes.to(tokens)
            pick = (d.embedding @ classes.T).argmax(dim=1)  # the zero-shot prediction
            direction = classes[pick] - classes.mean(dim=0)  # score(chosen) - mean score is linear in the patch
            per = torch.einsum("blphd,bd->blhp", tokens, direction).flatten(1, 2)  # [B, L*H, P]
            total = per.sum(dim=1, keepdim=True)
            maps.append(torch.cat([total, per], dim=1) if self.per_head else total)
            chosen.append(pick)
        b = pixels.shape[0]
        grid = torch.stack(maps, dim=1).reshape(b, len(self.classes), -1, *d.grid)
        return {"maps": grid.float().cpu(), "chosen": torch.stack(chosen, dim=1).cpu()}


def binarise(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps [K, H, W] -> (foreground scores [K, HW], background scores [K, HW], foreground [K, HW])
    by the published steps (clip at 0, min-max normalise, threshold at the mean; a constant map
    is all background and scores 0 in both channels)."""
    res = maps.flatten(1).float().clamp(min=0)
    lo, hi = res.min(dim=1, keepdim=True).values, res.max(dim=1, keepdim=True).values
    res = (res - lo) / (hi - lo)
    foreground = res > res.mean(dim=1, keepdim=True)
    return torch.nan_to_num(res, nan=0.0), torch.nan_to_num(1 - res, nan=0.0), foreground


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision per row [K, n] (scikit-learn's definition: sum over distinct thresholds of
    the recall step times the precision, ties taken together)."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    s = scores.gather(1, order)
    t = targets.gather(1, order).double()
    n = s.shape[1]
    hits = t.cumsum(dim=1)
    precision = hits / torch.arange(1, n + 1, dtype=torch.float64)
    last_of_tie = torch.ones_like(s, dtype=torch.bool)
    last_of_tie[:, :-1] = s[:, 1:] != s[:, :-1]
    positions = torch.where(last_of_tie, torch.arange(n).expand_as(s), torch.full_like(order, n))
    end = positions.flip(1).cummin(dim=1).values.flip(1)  # the end of each element's tie group
    at_end = precision.gather(1, end)
    return (t * at_end).sum(dim=1) / t.sum(dim=1).clamp(min=1)


class Tally:
    """Sums over images for K kinds of maps: correct pixels, pixels, per-class intersection and
    union, and AP (when asked)."""

    def __init__(self, k: int):
        self.correct = torch.zeros(k, dtype=torch.int64)
        self.pixels = torch.zeros(k, dtype=torch.int64)
        self.inter = torch.zeros((k, 2), dtype=torch.int64)
        self.union = torch.zeros((k, 2), dtype=torch.int64)
        self.ap = torch.zeros(k, dtype=torch.float64)
        self.images = 0

    def add(self, maps: torch.Tensor, truth: torch.Tensor, ap: bool = True, chunk: int = 1024) -> None:
        """``maps`` [n, K, H, W] against ``truth`` [n, K, H, W] bool (n images)."""
        n, k = maps.shape[:2]
        flat_maps = maps.reshape(n * k, *maps.shape[2:])
        flat_truth = truth.reshape(n * k, -1)
        for start in range(0, n * k, chunk):
            part = slice(start, start + chunk)
            fg_score, bg_score, fg = binarise(flat_maps[part])
            gt = flat_truth[part]
            kind = torch.arange(start, start + fg.shape[0]) % k
            # counts from three sums (float32 is exact far beyond any image's pixel count)
            fg_f, gt_f = fg.float(), gt.float()
            n_fg, n_gt, both = fg_f.sum(dim=1), gt_f.sum(dim=1), (fg_f * gt_f).sum(dim=1)
            pixels = gt.shape[1]
            inter = torch.stack([pixels - n_fg - n_gt + both, both], dim=1).round().long()
            union = torch.stack([pixels - both, n_fg + n_gt - both], dim=1).round().long()
            self.correct.index_add_(0, kind, inter.sum(dim=1))
            self.pixels.index_add_(0, kind, torch.full_like(kind, pixels))
            self.inter.index_add_(0, kind, inter)
            self.union.index_add_(0, kind, union)
            if ap:
                scores = torch.cat([bg_score, fg_score], dim=1)
                self.ap.index_add_(0, kind, average_precision(scores, torch.cat([~gt, gt], dim=1)))
        self.images += n

    def result(self, ap: bool = True) -> list[dict]:
        """Per kind: pixel accuracy, mIoU and mAP in percent (mAP None when not tallied)."""
        eps = np.spacing(1.0)  # as the published script, so an empty class counts as IoU 0
        iou = self.inter.double() / (self.union.double() + eps)
        out = []
        for i in range(len(self.correct)):
            out.append({"pixel_accuracy": 100 * float(self.correct[i]) / (float(self.pixels[i]) + eps),
                        "miou": 100 * float(iou[i].mean()),
                        "map": 100 * float(self.ap[i]) / self.images if ap and self.images else None})
        return out


# ------------------------------------------------------------------ the run
def _truth(dataset, indices: list[int], size: tuple[int, int]) -> torch.Tensor:
    """Ground truth [n, tasks, H, W] at the model's input size (nearest-neighbour, as published)."""
    h, w = size
    out = []
    for i in indices:
        masks = dataset.targets(i)
        out.append(np.stack([np.asarray(Image.fromarray(m.astype(np.uint8)).resize((w, h), Image.NEAREST)) > 0
                             for m in masks]))
    return torch.from_numpy(np.stack(out))


def load_classifier(path: str, dim: int) -> torch.Tensor:
    """A precomputed zero-shot classifier (.npy): [C, D] class embeddings, or [D, C] as the published
    script's ``imagenet_classifier_<model>.npy``; rows are normalised to unit length."""
    try:
        array = np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ClipInterpretError(f"cannot read classifier {path}: {err} (expected a .npy array of class "
                                 "embeddings)") from None
    if array.ndim != 2 or dim not in array.shape:
        raise ClipInterpretError(f"classifier {path} has shape {array.shape}; expected [classes, {dim}] or "
                                 f"[{dim}, classes] for this model's {dim}-dimensional joint space")
    weights = torch.from_numpy(np.ascontiguousarray(array if array.shape[1] == dim else array.T)).float()
    return weights / weights.norm(dim=1, keepdim=True)


def class_texts(model, dataset) -> list[torch.Tensor]:
    """Per task, the unit class embeddings the zero-shot prediction chooses from."""
    if dataset.kind == "toyworld":
        from .toyworld.evaluate import class_embeddings

        return [class_embeddings(model, t).float().cpu() for t in dataset.tasks]
    from open_clip import zero_shot_metadata as meta

    from .zeroshot import class_embeddings

    return [torch.from_numpy(class_embeddings(model, list(meta.IMAGENET_CLASSNAMES), meta.OPENAI_IMAGENET_TEMPLATES))]


def segbench(model, dataset_spec: str, layers="all", per_head: bool | None = None, batch_size: int = 32,
             limit: int | None = None, classifier: str | None = None, workers: int | None = None,
             decode: str = "auto", draft: bool = False, progress: bool = True) -> dict:
    """Run the benchmark (see the module doc). ``layers``: whose per-patch contributions make the
    maps (default all, as the published script). ``per_head``: also score each head's own map
    (default: on the toy world). ``limit``: the first images of imagenet-seg only. ``classifier``:
    a precomputed ImageNet classifier (.npy; default: the 1,000 class names with OpenAI's 80
    templates, computed once per model and cached). Returns the scores (percent), their chance
    values, and per head."""
    from tqdm import tqdm

    from .decompose import resolve_layers
    from .pipeline import pixel_batches

    dataset = open_dataset(dataset_spec, limit)
    if batch_size < 1:
        raise ClipInterpretError(f"batch size must be at least 1, got {batch_size}")
    vit = model.vit
    chosen_layers = resolve_layers(layers, vit.cfg.layers)
    per_head = dataset.kind == "toyworld" if per_head is None else per_head
    if classifier is not None and dataset.kind == "toyworld":
        raise ClipInterpretError("--classifier is for imagenet-seg; the toy world's classes are its properties' "
                                 "values")
    classes = [load_classifier(classifier, vit.cfg.output_dim)] if classifier else class_texts(model, dataset)
    compute = _SegMaps(vit, chosen_layers, model.precision, classes, per_head)
    size = tuple(vit.cfg.image_size)
    n_tasks = len(dataset.tasks)
    n_maps = 1 + (len(chosen_layers) * vit.cfg.heads if per_head else 0)
    tally = (Tally(n_tasks), Tally(n_tasks * n_maps) if per_head else None)
    chance = (Tally(n_tasks), Tally(n_tasks * n_maps) if per_head else None)
    ranges = [list(range(s, min(len(dataset), s + batch_size))) for s in range(0, len(dataset), batch_size)]
    started = time.time()
    failures, first, previous_truth = [], None, None
    with tqdm(total=len(dataset), desc="segbench", unit="img", disable=not progress) as bar:
        stream = pixel_batches(dataset, model.preprocess, ranges, vit.device, workers=workers, decode=decode,
                               draft=draft, compute=compute)
        for batch in stream:
            failures += batch.failures
            bar.update(len(batch.indices) + len(batch.failures))
            if not batch.indices:
                continue
            out = batch.result(compute)
            maps = F.interpolate(out["maps"].flatten(1, 2), size=size, mode="bilinear", align_corners=False)
            maps = maps.view(len(batch.indices), n_tasks, n_maps, *size)
            truth = _truth(dataset, batch.indices, size)[:, :, None].expand(-1, -1, n_maps, -1, -1)
            _add(tally, maps, truth, n_tasks)
            # chance: image i's map against image i-1's ground truth (the first image's against the last's)
            if first is None:
                first = maps[:1]
            else:
                _add(chance, maps[:1], previous_truth, n_tasks)
            if len(batch.indices) > 1:
                _add(chance, maps[1:], truth[:-1], n_tasks)
            previous_truth = truth[-1:]
    if first is None:
        raise ClipInterpretError(f"none of the {len(failures)} images of {dataset_spec} could be read")
    _add(chance, first, previous_truth, n_tasks)
    return _summary(dataset, model, chosen_layers, per_head, n_maps, tally, chance, failures, time.time() - started,
                    classifier)


def _add(tallies: tuple, maps: torch.Tensor, truth: torch.Tensor, n_tasks: int) -> None:
    """Tally the totals' maps with AP, and every map (per head) without AP: ranking heads needs
    only their IoU, and AP (a sort per map) would cost most of the benchmark."""
    totals, every = tallies
    totals.add(maps[:, :, 0], truth[:, :, 0], ap=True)
    if every is not None:
        n, _, n_maps = maps.shape[:3]
        every.add(maps.reshape(n, n_tasks * n_maps, *maps.shape[3:]),
                  truth.reshape(n, n_tasks * n_maps, *truth.shape[3:]), ap=False)


def _summary(dataset, model, layers, per_head, n_maps, tally, chance, failures, seconds, classifier) -> dict:
    from .decompose import head_name

    scored, baseline = tally[0].result(), chance[0].result()
    scored_maps = tally[1].result(ap=False) if per_head else None
    baseline_maps = chance[1].result(ap=False) if per_head else None
    names = [head_name(layer, h) for layer in layers for h in range(model.vit.cfg.heads)]
    tasks = {}
    for t, task in enumerate(dataset.tasks):
        total = t * n_maps
        entry = {"scores": scored[t], "chance": baseline[t]}
        if dataset.kind == "toyworld":
            entry["ground_truth"] = "objects" if task in OBJECT_PROPERTIES else "background"
        if per_head:
            heads = {}
            for h, name in enumerate(names):
                row = scored_maps[total + 1 + h]
                heads[name] = {"pixel_accuracy": row["pixel_accuracy"], "miou": row["miou"],
                               "chance_miou": baseline_maps[total + 1 + h]["miou"]}
            entry["heads"] = dict(sorted(heads.items(), key=lambda kv: -kv[1]["miou"]))
        tasks[task] = entry
    result = {"dataset": dataset.spec, "kind": dataset.kind, "n_images": tally[0].images, "failures": failures,
              "model": model.spec, "layers": layers, "tasks": tasks, "classifier": classifier,
              "seconds": round(seconds, 1), "published": PUBLISHED}
    if dataset.kind == "toyworld":
        objects = [t for t in dataset.tasks if t in OBJECT_PROPERTIES]
        result["objects"] = {k: float(np.mean([tasks[t]["scores"][k] for t in objects])) for k in METRICS}
        result["objects_chance"] = {k: float(np.mean([tasks[t]["chance"][k] for t in objects])) for k in METRICS}
        if per_head:
            ranking = {name: float(np.mean([tasks[t]["heads"][name]["miou"] for t in objects])) for name in names}
            chance_rank = {name: float(np.mean([tasks[t]["heads"][name]["chance_miou"] for t in objects]))
                           for name in names}
            result["heads_objects"] = [{"head": n, "miou": v, "chance_miou": chance_rank[n]}
                                       for n, v in sorted(ranking.items(), key=lambda kv: -kv[1])]
    return result


def format_segbench(result: dict, top: int = 5) -> str:
    """The scores beside chance (and, on ImageNet-Segmentation, beside the published figures)."""
    def row(label: str, s: dict, c: dict) -> str:
        return (f"  {label:<16}" + "".join(f"{s[k]:>8.2f} ({c[k]:5.2f})" if s[k] is not None else f"{'n/a':>16}"
                                           for k in METRICS))

    lines = [f"zero-shot segmentation, {result['dataset']}: {result['n_images']} images, maps of layers "
             f"{result['layers'][0]}-{result['layers'][-1]} (all heads, per patch) for the predicted class",
             f"  {'':<16}{'pixel acc':>16}{'mIoU':>16}{'mAP':>16}   percent; in brackets: chance (each map "
             "scored against the previous image's ground truth)"]
    for task, entry in result["tasks"].items():
        label = task + (" (bg)" if entry.get("ground_truth") == "background" else "")
        lines.append(row(label, entry["scores"], entry["chance"]))
    if "objects" in result:
        lines.append(row("objects", result["objects"], result["objects_chance"])
                     + "   (mean of the object properties)")
        lines.append("  (bg): the ground truth is the background (the property is the ground's); else the objects")
    if result["kind"] == "imagenet-seg":
        pub = result["published"]
        lines.append(f"  {'published':<16}{pub['pixel_accuracy']:>8.2f}{'':>8}{pub['miou']:>8.2f}{'':>8}{pub['map']:>8.2f}"
                     f"   ({pub['method']}; model: {pub['model']})")
    if result.get("heads_objects"):
        best = ", ".join(f"{h['head']} {h['miou']:.1f} ({h['chance_miou']:.1f})" for h in result["heads_objects"][:top])
        lines.append(f"heads that localise the objects best (mIoU of the head's own map, mean over the object "
                     f"properties; chance in brackets): {best}")
        for task, entry in result["tasks"].items():
            heads = list(entry["heads"].items())[:3]
            lines.append(f"  {task:<11} " + ", ".join(f"{h} {r['miou']:.1f} ({r['chance_miou']:.1f})"
                                                     for h, r in heads))
    if result["failures"]:
        lines.append(f"{len(result['failures'])} image(s) could not be read and were left out, e.g. "
                     f"{result['failures'][0]['source']}: {result['failures'][0]['reason']}")
    return "\n".join(lines)
