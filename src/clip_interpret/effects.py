"""Direct and total effects of interventions on a run's classification accuracy, per group.

``intervention_study(run, model, targets)`` re-reads the run's images through the
input pipeline and, batch by batch, computes the unmodified embedding, the direct
effect and the total effect of replacing the targets (``clip_interpret.interventions``),
then scores each with a classifier per task:

* zero-shot: the run's zero-shot tasks (``zeroshot.zero_shot_tasks``);
* a linear probe (``probe=OTHER_RUN``): multinomial logistic regression fitted, for each
  variant, on the other run's embeddings *under the same intervention* (a probe trained
  on biased data is where spurious cues bite hardest; refitting it on the ablated
  representation asks whether the cue can still be used once the heads are gone).

With ``groups=COLUMN`` (a label set of the run, e.g. the background of each image),
accuracy is also reported per group (every combination of a task's class and the
column's value), with the worst group and the average: the spurious-cue experiment
of arXiv 2310.05916 (Waterbirds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ClipInterpretError
from .interventions import MODES, Targets, activations, direct_effect, total_effect
from .probe import fit_probe

VARIANTS = ("full", "direct", "total")


def run_source(run):
    """The run's image source, opened again (its list must hash as when the run was made)."""
    from .runstore import open_source

    spec = run.source_spec
    try:
        source = open_source(spec)
    except ClipInterpretError as err:
        raise ClipInterpretError(f"run {run.path}: its images ({spec}) cannot be opened again: {err}. Total "
                                 "effects re-run the model on the images; run from where the run was made") from None
    if source.list_hash() != run.source_hash:
        raise ClipInterpretError(f"run {run.path}: the images at {spec} are no longer the ones it was made from "
                                 "(the list changed); index them again")
    return source


@dataclass
class _Means:
    """A batch's sums of the targets' activations (per token position): the reference means."""

    vit: torch.nn.Module
    targets: Targets
    precision: str

    def __call__(self, pixels):
        acts = activations(self.vit, pixels, self.targets, self.precision)
        return {name: value.double().sum(dim=0).cpu() for name, value in acts.items()}, pixels.shape[0]


@dataclass
class _Variants:
    """A batch's unit embeddings: unmodified, direct effect, total effect (CPU)."""

    vit: torch.nn.Module
    targets: Targets
    mode: str
    values: dict | None
    precision: str

    def __call__(self, pixels):
        full, direct = direct_effect(self.vit, pixels, self.targets, self.mode, self.values, self.precision)
        total = total_effect(self.vit, pixels, self.targets, self.mode, self.values, self.precision)
        return torch.stack([full, direct, total]).cpu()  # [3, B, D]


def _stream(run, model, compute, batch_size: int, workers, limit: int | None = None):
    from .pipeline import pixel_batches

    source = run_source(run)
    rows = run.source_indices.tolist()[:limit]
    batches = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    for batch in pixel_batches(source, model.preprocess, batches, model.device, workers=workers, compute=compute):
        if batch.failures:
            raise ClipInterpretError(f"run {run.path}: {batch.failures[0]['source']} can no longer be read "
                                     f"({batch.failures[0]['reason']})")
        yield batch.result(compute)


def variant_embeddings(run, model, targets: Targets, mode: str = "mean", values: dict | None = None,
                       batch_size: int = 64, workers=None, mean_images: int | None = None) -> dict[str, np.ndarray]:
    """Unit embeddings [N, D] of the run's images: ``full``, ``direct`` and ``total`` effect of the
    intervention; ``mean`` values default to the means over (the first ``mean_images`` of) the run."""
    if mode not in MODES or mode == "patch":
        raise ClipInterpretError(f"mode {mode!r} is not for a run; choose zero or mean (patching pairs images: "
                                 "use clip_interpret.interventions directly)")
    precision = model.precision
    if mode == "mean" and values is None:
        sums, n = {}, 0
        for part, count in _stream(run, model, _Means(model.vit, targets, precision), batch_size, workers,
                                   mean_images):
            sums = {k: sums.get(k, 0) + v for k, v in part.items()}
            n += count
        values = {k: (v / n).float() for k, v in sums.items()}
    compute = _Variants(model.vit, targets, mode, values, precision)
    parts = list(_stream(run, model, compute, batch_size, workers))
    stacked = torch.cat(parts, dim=1).numpy()
    return dict(zip(VARIANTS, stacked))


def group_scores(correct: np.ndarray, labels: np.ndarray, groups: list[str], class_names: list[str]) -> dict:
    per = {}
    for c in np.unique(labels):
        for g in sorted(set(groups)):
            mask = (labels == c) & (np.asarray(groups) == g)
            if mask.any():
                per[f"{class_names[c]} / {g}"] = {"accuracy": float(correct[mask].mean()), "n": int(mask.sum())}
    worst = min(per, key=lambda k: per[k]["accuracy"])
    return {"groups": per, "worst_group": worst, "worst_group_accuracy": per[worst]["accuracy"],
            "average_accuracy": float(correct.mean())}


def intervention_study(run, model, targets: Targets, mode: str = "mean", groups: str | None = None,
                       probe=None, batch_size: int = 64, workers=None, mean_images: int | None = None) -> dict:
    """Accuracy per task (and per group) of the unmodified model and of the direct and total
    effects of the intervention (see the module doc). ``probe``: a run (same model) to fit
    linear probes on; default: zero-shot classification."""
    from .zeroshot import zero_shot_tasks

    run.check_model(model)
    if groups is not None and groups not in run.labels:
        raise ClipInterpretError(f"run {run.path} has no label set {groups!r} to group by; it has: "
                                 f"{', '.join(sorted(run.labels)) or 'none'}")
    tasks = zero_shot_tasks(run, model)
    embeddings = variant_embeddings(run, model, targets, mode, batch_size=batch_size, workers=workers,
                                    mean_images=mean_images)
    predictors = {}
    if probe is not None:
        probe.check_model(model)
        probe_tasks = {t.name: t for t in zero_shot_tasks(probe, model)}
        missing = [t.name for t in tasks if t.name not in probe_tasks]
        if missing:
            raise ClipInterpretError(f"probe run {probe.path} has no labels for task(s) {', '.join(missing)}")
        train = variant_embeddings(probe, model, targets, mode, batch_size=batch_size, workers=workers,
                                   mean_images=mean_images)
        for task in tasks:
            theirs = probe_tasks[task.name]
            index = [task.class_names.index(name) for name in theirs.class_names]
            labels = np.asarray(index)[theirs.labels]
            predictors[task.name] = {v: fit_probe(train[v], labels, len(task.class_names)) for v in VARIANTS}
    result = {"targets": targets.describe(), "mode": mode, "n_images": len(run),
              "classifier": f"linear probe fitted on {probe.path}" if probe is not None else "zero-shot",
              "tasks": [t.name for t in tasks], "accuracy": {}, "groups": {} if groups else None,
              "group_column": groups}
    for variant in VARIANTS:
        result["accuracy"][variant] = {}
        for task in tasks:
            if probe is not None:
                predicted = predictors[task.name][variant](embeddings[variant])
            else:
                predicted = (embeddings[variant] @ task.classes.T).argmax(axis=1)
            correct = predicted == task.labels
            result["accuracy"][variant][task.name] = float(correct.mean())
            if groups:
                result["groups"].setdefault(variant, {})[task.name] = group_scores(
                    correct, task.labels, run.labels[groups], task.class_names)
        result["accuracy"][variant]["mean"] = float(np.mean([result["accuracy"][variant][t.name] for t in tasks]))
    return result


def format_study(result: dict) -> str:
    names = {"full": "unmodified", "direct": f"direct effect ({result['mode']}-ablated)",
             "total": f"total effect ({result['mode']}-ablated)"}
    tasks = result["tasks"] + ["mean"]
    lines = [f"{result['targets']}: {result['classifier']}, {result['n_images']} images",
             " " * 32 + "".join(f"{t[:10]:>11}" for t in tasks)]
    for variant, row in result["accuracy"].items():
        lines.append(f"{names[variant]:<32}" + "".join(f"{row[t]:>10.1%} " for t in tasks))
    if result["groups"]:
        lines.append(f"\nby group ({result['group_column']}): worst-group / average accuracy")
        for task in result["tasks"]:
            for variant in VARIANTS:
                g = result["groups"][variant][task]
                lines.append(f"  {task:<10} {names[variant]:<32} worst {g['worst_group_accuracy']:>6.1%} "
                             f"({g['worst_group']}), average {g['average_accuracy']:>6.1%}")
    return "\n".join(lines)


def intervention_targets(run, heads: str | None = None, prop: str | None = None, labels=None) -> Targets:
    """The targets of an intervention on ``run``: ``heads`` (``"L10.H3,MLP10,ATTN10"``) and, with ``prop``,
    every head labelled with that property in ``labels`` (a labels file or a run folder; default the run's
    labels.json)."""
    from pathlib import Path

    from .labels import head_labels, heads_with_property

    spec = heads or ""
    if prop:
        found = head_labels(Path(labels)) if labels else head_labels(run.path)
        chosen = heads_with_property(found, prop)
        if not chosen:
            raise ClipInterpretError(f"no head is labelled {prop!r} in {labels or run.path / 'labels.json'}")
        spec = ",".join([p for p in (spec, ",".join(chosen)) if p])
    return Targets.parse(spec, run.vit_config())


def save_intervention(run, result: dict, targets: Targets):
    """Write ``result`` as RUN/intervention-TARGETS.json (whole or absent); returns the path."""
    import re

    from .runstore.store import atomic_write_json

    name = re.sub(r"[^A-Za-z0-9]+", "-", targets.describe()).strip("-").lower()[:60].rstrip("-") or "x"
    path = run.path / f"intervention-{name}.json"  # the name the command line has always given it
    atomic_write_json(path, result)
    return path
