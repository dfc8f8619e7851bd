"""Faithfulness of head labels, checked by ablation (beyond the paper).

For every analysed head h and every zero-shot task t of the run, h alone is
mean-ablated (its contribution replaced by its mean over the run's images;
everything else exact) and two drops are measured:

    accuracy drop  acc_t(full) - acc_t(ablated)
    margin drop    mean_i[m_i(full) - m_i(ablated)] / std_i[m_i(full)]

with m_i the margin of image i's correct class over the best other class (cosine
similarities). Single-head accuracy drops are mostly zero on a model that spreads
a property over several heads with wide margins (one head rarely flips a
prediction), and on tasks near chance they are noise, so they cannot rank
properties; the margin drop is their continuous version, in units of the task's
own margin spread, and decides the verdict. Both are reported.

A head labelled with property p is *confirmed* when p is one of the run's tasks
and p's drop is positive and the largest of the head's drops over all tasks;
*refuted* otherwise. Labels naming no task (e.g. "animal" on the toy world) are
*untestable* here. On the toy world the tasks are the seven toy properties, so
this is a known-answer check of every labeller; on a labelled image folder the
task is the folder's classes (property ``class``).
"""

from __future__ import annotations

import numpy as np
import torch

from .cluster import map_shards, one_session
from .errors import ClipInterpretError
from .labels.store import normalise_property


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct-class score minus the best other class, along the last axis ([..., C] -> [...])."""
    correct = logits.gather(-1, labels[..., None])[..., 0]
    others = logits.scatter(-1, labels[..., None], float("-inf"))
    return correct - others.max(dim=-1).values


def _head_sums(run, positions, device):
    """Sum of every analysed head's contributions [HH, D] (float64) over the shards at ``positions``."""
    from .ablation import iter_rows

    start_h, stop_h = run.layout["heads"]
    total = torch.zeros((stop_h - start_h, run.dim), dtype=torch.float64, device=device)
    for _, rows in iter_rows(run, device, positions):
        total += rows[:, start_h:stop_h].sum(dim=0)
    return total.cpu().numpy()


def _drops_partial(run, positions, device, tasks, mean):
    """Sums over the shards at ``positions``: correct predictions (full, and per head ablated),
    margin drops per (head, task), and the full model's margins and their squares."""
    from .ablation import iter_rows, task_tensors

    on_device = [task_tensors(t, device) for t in tasks]
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device)  # [HH, D]
    n_heads, n_tasks = mean.shape[0], len(tasks)
    start_h, stop_h = run.layout["heads"]
    f64 = dict(dtype=torch.float64, device=device)
    base_correct = torch.zeros(n_tasks, **f64)
    ablated_correct = torch.zeros((n_heads, n_tasks), **f64)
    margin_drop_sum = torch.zeros((n_heads, n_tasks), **f64)
    margin_sum, margin_sq = torch.zeros(n_tasks, **f64), torch.zeros(n_tasks, **f64)
    for start, rows in iter_rows(run, device, positions):
        stop = start + rows.shape[0]
        emb = rows.sum(dim=1)  # the exact reconstruction [S, D]
        heads = rows[:, start_h:stop_h]  # [S, HH, D]
        for t, (all_labels, classes) in enumerate(on_device):
            labels = all_labels[start:stop]
            logits = emb @ classes.T  # [S, C]
            base_correct[t] += (logits.argmax(dim=1) == labels).sum()
            base_margin = _margins(logits, labels)  # [S]
            margin_sum[t] += base_margin.sum()
            margin_sq[t] += (base_margin.double() ** 2).sum()
            ablated = logits[:, None, :] + (mean[None] - heads) @ classes.T  # [S, HH, C]
            per_head = labels[:, None].expand(-1, n_heads)
            ablated_correct[:, t] += (ablated.argmax(dim=2) == per_head).sum(dim=0)
            margin_drop_sum[:, t] += (base_margin[:, None] - _margins(ablated, per_head)).sum(dim=0)
    return tuple(x.cpu().numpy() for x in (base_correct, ablated_correct, margin_drop_sum, margin_sum, margin_sq))


@one_session
def head_ablation_drops(run, model, device=None, engine=None) -> dict:
    """Accuracy and margin drops per (head, task) when each analysed head alone is mean-ablated.
    Computed on ``device`` (default: the model's), one shard at a time; with ``engine="ray"``
    (or a ``cluster.Engine``), by Ray tasks over groups of shards."""
    from .ablation import _device, zero_shot_tasks
    device = _device(model, device)
    tasks = zero_shot_tasks(run, model)
    names = run.head_names()
    n = len(run)
    if n == 0:
        raise ClipInterpretError(f"run {run.path} holds no images")
    mean = map_shards(run, _head_sums, (), device, engine) / n  # [HH, D]
    base_correct, ablated_correct, margin_drop_sum, margin_sum, margin_sq = map_shards(
        run, _drops_partial, (tasks, mean), device, engine)
    spread = np.sqrt(np.clip(margin_sq / n - (margin_sum / n) ** 2, 1e-12, None))
    accuracy_drop = (base_correct[None] - ablated_correct) / n
    margin_drop = margin_drop_sum / n / spread[None]
    base = base_correct / n
    task_names = [t.name for t in tasks]
    return {"tasks": task_names, "n_images": n, "accuracy": dict(zip(task_names, base.tolist())),
            "drops": {name: dict(zip(task_names, map(float, margin_drop[i]))) for i, name in enumerate(names)},
            "accuracy_drops": {name: dict(zip(task_names, map(float, accuracy_drop[i])))
                               for i, name in enumerate(names)},
            "stamp": {"fingerprint": run.manifest["model"]["fingerprint"],
                      "source_hash": run.manifest["source"]["hash"]}}


def confirm_labels(labels: dict[str, str | None], drops: dict) -> dict:
    """Per labelled head: its own task's drop, the task that dropped most, and the verdict
    (``confirmed``, ``refuted`` or ``untestable``); plus the share confirmed among testable labels."""
    tasks = {normalise_property(t): t for t in drops["tasks"]}
    heads, confirmed, confirmed_acc, testable = {}, 0, 0, 0
    for head, label in labels.items():
        if not label or head not in drops["drops"]:
            continue
        row = drops["drops"][head]
        worst = max(row, key=row.get)
        own = tasks.get(normalise_property(label))
        if own is None:
            heads[head] = {"label": label, "verdict": "untestable", "most_hurt": worst, "drop": None,
                           "max_drop": row[worst]}
            continue
        testable += 1
        ok = row[own] > 0 and row[own] >= row[worst]
        acc = drops["accuracy_drops"][head]
        ok_acc = acc[own] > 0 and acc[own] >= max(acc.values())
        confirmed += ok
        confirmed_acc += ok_acc
        heads[head] = {"label": label, "verdict": "confirmed" if ok else "refuted", "most_hurt": worst,
                       "drop": row[own], "max_drop": row[worst], "accuracy_drop": acc[own],
                       "confirmed_by_accuracy": bool(ok_acc)}
    return {"heads": heads, "testable": testable, "confirmed": confirmed, "confirmed_by_accuracy": confirmed_acc,
            "share_confirmed": confirmed / testable if testable else None,
            "share_confirmed_by_accuracy": confirmed_acc / testable if testable else None}


def format_confirmation(result: dict, title: str) -> str:
    share = result["share_confirmed"]
    lines = [f"{title}: {result['confirmed']} of {result['testable']} testable labels confirmed"
             + (f" ({share:.0%}; by accuracy drops alone: {result['share_confirmed_by_accuracy']:.0%})"
                if share is not None else "")]
    for head, row in result["heads"].items():
        if row["drop"] is None:
            lines.append(f"  {head:<7} {row['label']:<12} untestable (no such task)")
            continue
        lines.append(f"  {head:<7} {row['label']:<12} {row['verdict']:<10} margin drop {row['drop']:+.3f} "
                     f"(accuracy {row['accuracy_drop']:+.1%}); most hurt: {row['most_hurt']} {row['max_drop']:+.3f}")
    return "\n".join(lines)
