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
*untestable* here. Two verdict rules compare the drops (``VERDICTS``):

    margin     the drops as they are (the head's most hurt task, in units of each
               task's margin spread)
    relative   each task's drop divided by that task's mean absolute drop over the
               run's analysed heads: the task this head matters to most compared
               with a typical head. Some tasks lose margin whenever any head is
               removed (a binary task, a fragile one); this rule does not let that
               general fragility outvote the head's specific effect.

On the toy world the tasks are the seven toy properties, so this is a
known-answer check of every labeller; on a labelled image folder the task is
the folder's classes (property ``class``).

Every confirmed share comes with its chance baseline (``shuffled_baseline``):
the same labels shuffled over the same heads, 1,000 seeded permutations by
default, giving the share chance reaches on average, its 95th percentile and the
permutation p-value of the observed share.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine import map_shards, one_session
from .errors import ClipInterpretError
from .labels.store import normalise_property


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct-class score minus the best other class, along the last axis ([..., C] -> [...])."""
    correct = logits.gather(-1, labels[..., None])[..., 0]
    others = logits.scatter(-1, labels[..., None], float("-inf"))
    return correct - others.max(dim=-1).values


def _head_sums(run, positions, device):
    """Sum of every analysed head's contributions [HH, D] (float64) over the shards at ``positions``."""

    start_h, stop_h = run.layout["heads"]
    total = torch.zeros((stop_h - start_h, run.dim), dtype=torch.float64, device=device)
    for _, rows in run.iter_rows(device, positions):
        total += rows[:, start_h:stop_h].sum(dim=0)
    return total.cpu().numpy()


def _drops_partial(run, positions, device, tasks, mean):
    """Sums over the shards at ``positions``: correct predictions (full, and per head ablated),
    margin drops per (head, task), and the full model's margins and their squares."""
    from .zeroshot import task_tensors

    on_device = [task_tensors(t, device) for t in tasks]
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device)  # [HH, D]
    n_heads, n_tasks = mean.shape[0], len(tasks)
    start_h, stop_h = run.layout["heads"]
    f64 = dict(dtype=torch.float64, device=device)
    base_correct = torch.zeros(n_tasks, **f64)
    ablated_correct = torch.zeros((n_heads, n_tasks), **f64)
    margin_drop_sum = torch.zeros((n_heads, n_tasks), **f64)
    margin_sum, margin_sq = torch.zeros(n_tasks, **f64), torch.zeros(n_tasks, **f64)
    for start, rows in run.iter_rows(device, positions):
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
    (or an ``engine.Engine``), by Ray tasks over groups of shards."""
    from .device import compute_device
    from .zeroshot import zero_shot_tasks
    device = compute_device(model, device)
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
            "stamp": run.stamp()}


VERDICTS = ("margin", "relative")


def verdict_scores(drops: dict, verdict: str = "margin") -> dict[str, dict[str, float]]:
    """Per head, per task, the score a verdict rule compares (see the module doc): the margin drops
    themselves (``margin``), or each divided by its task's mean absolute drop over the heads (``relative``)."""
    rows = drops["drops"]
    if verdict == "margin":
        return rows
    if verdict != "relative":
        raise ClipInterpretError(f"unknown verdict rule {verdict!r}; expected one of {', '.join(VERDICTS)}")
    scale = {t: float(np.mean([abs(row[t]) for row in rows.values()])) if rows else 0.0 for t in drops["tasks"]}
    return {head: {t: (value / scale[t] if scale[t] > 0 else 0.0) for t, value in row.items()}
            for head, row in rows.items()}


def confident_labels(heads: dict[str, dict], min_confidence: float = 0.0) -> dict[str, str | None]:
    """``{head: label}`` from a labels file's ``heads``, a label whose confidence is below ``min_confidence``
    counted as an abstention (None). Labels without a confidence (manual ones) are kept."""
    if not 0.0 <= min_confidence <= 1.0:
        raise ClipInterpretError(f"min_confidence must be in [0, 1], got {min_confidence}")
    out = {}
    for head, entry in heads.items():
        confidence = entry.get("confidence")
        keep = confidence is None or float(confidence) >= min_confidence
        out[head] = entry.get("label") if keep else None
    return out


def _verdicts(labels: dict[str, str | None], drops: dict) -> dict:
    """Per labelled head of ``drops``: its label and whether each task would confirm it."""
    tasks = {normalise_property(t): t for t in drops["tasks"]}
    out = {}
    for head, label in labels.items():
        if label and head in drops["drops"]:
            out[head] = (label, tasks.get(normalise_property(label)))
    return out


def _confirms(row: dict, task: str | None) -> bool:
    return task is not None and row[task] > 0 and row[task] >= max(row.values())


def shuffled_baseline(labels: dict[str, str | None], drops: dict, permutations: int = 1000, seed: int = 0,
                      verdict: str = "margin") -> dict:
    """Chance baseline of the confirmed share: the same labels shuffled over the same (labelled)
    heads ``permutations`` times (seeded). Returns the share's mean, 95th percentile and the
    permutation p-value ``(1 + #{shuffled >= observed}) / (1 + permutations)``.

    Shuffling keeps which heads are labelled and how often each property is used, so the
    baseline asks one thing only: did each property go to the head that carries it?"""
    import numpy as np

    if permutations < 1:
        raise ClipInterpretError(f"the chance baseline needs at least 1 permutation, got {permutations}")
    given = _verdicts(labels, drops)
    heads = list(given)
    tasks = sorted({t for _, t in given.values() if t is not None})
    testable = sum(t is not None for _, t in given.values())
    if not testable:
        return {"permutations": permutations, "seed": seed, "verdict": verdict, "mean": None, "p95": None,
                "p_value": None}
    # ok[i, j]: would head i be confirmed if it carried the j-th head's label?
    column = {t: k for k, t in enumerate(tasks)}
    rows = verdict_scores(drops, verdict)
    table = np.array([[_confirms(rows[h], t) for t in tasks] + [False] for h in heads])
    label_col = np.array([column[t] if t is not None else len(tasks) for _, t in given.values()])
    observed = table[np.arange(len(heads)), label_col].sum()
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((permutations, len(heads))), axis=1)  # one uniform permutation per row
    counts = table[np.arange(len(heads))[None, :], label_col[order]].sum(axis=1)
    shares = counts / testable
    return {"permutations": permutations, "seed": seed, "verdict": verdict, "mean": float(shares.mean()),
            "p95": float(np.percentile(shares, 95)),
            "p_value": float((1 + (counts >= observed).sum()) / (1 + permutations))}


def confirm_labels(labels: dict[str, str | None], drops: dict, permutations: int = 1000, seed: int = 0,
                   verdict: str = "margin") -> dict:
    """Per labelled head: its own task's drop, the task the verdict rule finds most hurt, and the verdict
    (``confirmed``, ``refuted`` or ``untestable``); the share confirmed among testable labels,
    and its chance baseline (``chance``: see ``shuffled_baseline``), both under the rule ``verdict``
    (``margin`` or ``relative``, see the module doc; the accuracy-drop verdict is always the plain one)."""
    scores = verdict_scores(drops, verdict)
    heads, confirmed, confirmed_acc, testable = {}, 0, 0, 0
    for head, (label, own) in _verdicts(labels, drops).items():
        row = drops["drops"][head]
        score = scores[head]
        worst = max(score, key=score.get)
        if own is None:
            heads[head] = {"label": label, "verdict": "untestable", "most_hurt": worst, "drop": None,
                           "max_drop": row[worst]}
            continue
        testable += 1
        ok = _confirms(score, own)
        acc = drops["accuracy_drops"][head]
        ok_acc = _confirms(acc, own)
        confirmed += ok
        confirmed_acc += ok_acc
        heads[head] = {"label": label, "verdict": "confirmed" if ok else "refuted", "most_hurt": worst,
                       "drop": row[own], "max_drop": row[worst], "accuracy_drop": acc[own],
                       "confirmed_by_accuracy": bool(ok_acc)}
    return {"verdict": verdict, "heads": heads, "testable": testable, "confirmed": confirmed,
            "confirmed_by_accuracy": confirmed_acc,
            "share_confirmed": confirmed / testable if testable else None,
            "share_confirmed_by_accuracy": confirmed_acc / testable if testable else None,
            "chance": shuffled_baseline(labels, drops, permutations, seed, verdict)}


def format_chance(chance: dict) -> str:
    """``chance (labels shuffled over the heads, 1000x): mean 27%, 95th percentile 44%, p = 0.001``."""
    if chance.get("mean") is None:
        return "chance: n/a (no testable label)"
    return (f"chance (same labels shuffled over the heads, {chance['permutations']}x): mean {chance['mean']:.0%}, "
            f"95th percentile {chance['p95']:.0%}, p = {chance['p_value']:.3g}")


def format_share(result: dict) -> str:
    """One line: confirmed of testable, the share, and what chance gives."""
    share = result["share_confirmed"]
    if share is None:
        return f"{result['confirmed']} of {result['testable']} testable labels confirmed by ablation"
    return (f"{result['confirmed']} of {result['testable']} testable labels confirmed by ablation ({share:.0%}; "
            f"{format_chance(result['chance'])})")


def format_confirmation(result: dict, title: str) -> str:
    lines = [f"{title}: {format_share(result)}"]
    if result["share_confirmed"] is not None:
        lines.append(f"  by accuracy drops alone: {result['share_confirmed_by_accuracy']:.0%}")
    for head, row in result["heads"].items():
        if row["drop"] is None:
            lines.append(f"  {head:<7} {row['label']:<12} untestable (no such task)")
            continue
        lines.append(f"  {head:<7} {row['label']:<12} {row['verdict']:<10} margin drop {row['drop']:+.3f} "
                     f"(accuracy {row['accuracy_drop']:+.1%}); most hurt: {row['most_hurt']} {row['max_drop']:+.3f}")
    return "\n".join(lines)
