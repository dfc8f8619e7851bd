"""Zero-shot accuracy of reconstructed embeddings: the mean-ablation study.

Works on a run directory, streaming over its shards (memory stays flat). The
stored pieces live in the joint space, so "mean-ablating" a piece replaces it
by its mean over the run's images there. Variants:

* ``full``: the sum of every stored piece (the exact reconstruction);
* ``MLPs mean-ablated``: every block's MLP piece replaced by its mean;
* ``attention 0..k mean-ablated``: the whole attention output of layers 0..k
  (heads, bias, or the stored layer total) replaced by its mean, k = 0, 1, ...

Tasks: the run's zero-shot tasks (``zeroshot.zero_shot_tasks``).
"""

from __future__ import annotations

import numpy as np
import torch

from .device import compute_device
from .engine import map_shards, one_session
from .errors import ClipInterpretError
from .zeroshot import Task, task_tensors, zero_shot_tasks  # noqa: F401  (their home before zeroshot.py)

def layer_parts(rows: torch.Tensor, run):
    """``run.layer_parts(rows)`` (kept for callers of the old name)."""
    return run.layer_parts(rows)


def iter_rows(run, device="cpu", positions=None):
    """``run.iter_rows(device, positions)`` (kept for callers of the old name)."""
    return run.iter_rows(device, positions)


def _means_partial(run, positions, device):
    """Sums of every layer's attention and MLP pieces ([L, D] each, float64) and the row count."""
    n_layers, d = run.n_layers, run.dim
    attn_sum = torch.zeros((n_layers, d), dtype=torch.float64, device=device)
    mlp_sum, n = torch.zeros_like(attn_sum), 0
    for _, rows in run.iter_rows(device, positions):
        attn, mlps, _, _ = run.layer_parts(rows)
        attn_sum += attn.sum(dim=0)
        mlp_sum += mlps.sum(dim=0)
        n += rows.shape[0]
    return attn_sum.cpu().numpy(), mlp_sum.cpu().numpy(), n


def piece_means(run, device="cpu", engine=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset means of every layer's attention and MLP pieces ([L, D] each, float64 sums),
    on ``device``; ``engine``: see ``clip_interpret.engine.map_shards``."""
    attn_sum, mlp_sum, n = map_shards(run, _means_partial, (), device, engine)
    if n == 0:
        raise ClipInterpretError(f"run {run.path} holds no images")
    return (torch.as_tensor(attn_sum / n, device=device).float(),
            torch.as_tensor(mlp_sum / n, device=device).float())


def _ablation_partial(run, positions, device, tasks, attn_mean, mlp_mean):
    """Correct predictions [variants, tasks] over the shards at ``positions`` (see ablation_study)."""
    on_device = [task_tensors(t, device) for t in tasks]
    attn_mean, mlp_mean = torch.as_tensor(attn_mean, device=device), torch.as_tensor(mlp_mean, device=device)
    n_layers = attn_mean.shape[0]
    correct = torch.zeros((2 + n_layers, len(on_device)), dtype=torch.float64, device=device)
    for start, rows in run.iter_rows(device, positions):
        attn, mlps, _, rest = run.layer_parts(rows)
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
    (or an ``engine.Engine``), by Ray tasks over groups of shards."""
    device = compute_device(model, device)
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
