"""Spurious heads located by contrast and corrected (Locate-Then-Correct, arXiv 2505.17425), on a run.

Everything here reads the run store's direct contributions (``run.iter_rows``: one shard in memory at
a time, no re-run of the image tower); the model is used for its text embeddings only.

**Locate.** On a locating split V (``val=RUN``; default the probe run, else half of the run's rows,
drawn with a fixed seed; never the rows that are reported), for every analysed head (l, h) with
contribution c_i (its stored piece for image i) and its mean m over V, each image is classified from
that head alone, zero-shot: the predicted value of attribute A is argmax_k <c_i - m, t^A_k>, where
t^A_k are the unit text embeddings of A's values (``zeroshot.zero_shot_tasks``). With GA_A(l, h) the
group-balanced accuracy of that prediction (the mean, over the groups g = (class, spurious value)
present in V, of the accuracy inside g: on a biased split a head that reads the cue then scores at
chance on the class, and one that reads the class at chance on the cue),

    score(l, h) = GA_spurious(l, h) - GA_class(l, h)

(the contrast of the paper: the head's direct effect separates the spurious attribute more than the
class). Spurious heads: the ``k`` highest scores (``k=N``), or every head with score >= ``threshold``;
by default ``k`` is chosen on V: among k = 0, 1, 2, 3, 4, 6, 8, 12, 16, 20, 24, ... up to ``max_k`` (heads of
positive score only), the k whose correction gives the best worst-group class accuracy on V (with a probe:
the probe fitted on the probe run under that correction; else zero-shot; ties: the smaller k).

**Correct.** Each spurious head is mean-ablated (c_i -> m, the mean over V); the class heads (the other
heads with score < 0: they separate the class more than the cue) keep their contribution minus its
component in the spurious direction, c_i -> (I - U U^T) c_i, U an orthonormal basis of the spurious
values' centred text embeddings (for two values: (t_1 - t_0) / |t_1 - t_0|). The corrected embedding is
the sum of the run's pieces so changed, normalised.

**Report.** Per-group (class x spurious value), worst-group and average accuracy of the class on the
evaluated rows, zero-shot and (``probe=RUN``) with a linear probe fitted on the probe run's embeddings
under the same correction, for: ``unmodified``, ``projection`` (class heads projected, nothing ablated),
``located`` (located heads mean-ablated only), ``debiased`` (both), ``labelled`` (the heads the labels
name for the spurious property, mean-ablated: the ``ablate --groups`` experiment, as a direct effect
on the stored pieces) and ``random`` (as many heads drawn from the others, mean-ablated, with and
without the projection; several draws, averaged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ClipInterpretError


@dataclass
class Variant:
    """A correction: heads (indices into the run's analysed heads) mean-ablated, heads projected."""

    ablate: list[int] = field(default_factory=list)
    project: list[int] = field(default_factory=list)


def spurious_basis(texts: np.ndarray) -> np.ndarray:
    """Orthonormal basis [D, r] of the centred text embeddings [K, D] of an attribute's values (r = K - 1)."""
    centred = np.asarray(texts, dtype=np.float64) - np.asarray(texts, dtype=np.float64).mean(axis=0)
    u, s, _ = np.linalg.svd(centred.T, full_matrices=False)
    keep = s > 1e-8 * max(float(s.max(initial=0.0)), 1e-30)
    if not keep.any():
        raise ClipInterpretError("the spurious attribute's values have identical text embeddings: no direction "
                                 "to project out")
    return u[:, keep]


def project_out(contributions: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Contributions [..., D] minus their component in span(basis) (orthonormal [D, r])."""
    c = np.asarray(contributions, dtype=np.float64)
    return c - (c @ basis) @ basis.T


def group_balanced_accuracy(correct: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean over groups of the accuracy inside each group; ``correct`` [N, ...], ``groups`` [N] ints."""
    values = [correct[groups == g].mean(axis=0) for g in np.unique(groups)]
    return np.mean(values, axis=0)


def _head_rows(run) -> tuple[int, int]:
    return tuple(run.layout["heads"])


def _rows_mask(run, rows) -> np.ndarray:
    mask = np.ones(len(run), bool) if rows is None else np.asarray(rows, bool)
    if mask.shape != (len(run),):
        raise ClipInterpretError(f"row mask of {mask.shape} for a run of {len(run)} images")
    return mask


def head_scores(run, spurious_texts: np.ndarray, class_texts: np.ndarray, spurious_labels: np.ndarray,
                class_labels: np.ndarray, rows=None) -> dict:
    """One streamed pass over ``run`` (its ``rows``, a boolean mask): per head, the group-balanced
    zero-shot accuracy of the spurious attribute and of the class from that head alone, the score
    (their difference) and the heads' mean contribution [H, D] (see the module doc)."""
    mask = _rows_mask(run, rows)
    lo, hi = _head_rows(run)
    t = np.concatenate([spurious_texts, class_texts]).astype(np.float64).T  # [D, Ks + Kc]
    logits, total, n = [], 0.0, 0
    for start, pieces in run.iter_pieces():
        keep = mask[start:start + len(pieces)]
        if not keep.any():
            continue
        heads = np.asarray(pieces[keep][:, lo:hi], dtype=np.float64)  # [S, H, D]
        logits.append(heads @ t)
        total = total + heads.sum(axis=0)
        n += len(heads)
    if n == 0:
        raise ClipInterpretError(f"run {run.path}: no images to locate the heads on")
    mean = total / n
    logits = np.concatenate(logits) - (mean @ t)[None]  # <c - m, t>
    ks = len(spurious_texts)
    s_pred, c_pred = logits[..., :ks].argmax(-1), logits[..., ks:].argmax(-1)  # [N, H]
    s_lab, c_lab = np.asarray(spurious_labels)[mask], np.asarray(class_labels)[mask]
    groups = c_lab * ks + s_lab
    ga_s = group_balanced_accuracy(s_pred == s_lab[:, None], groups)
    ga_c = group_balanced_accuracy(c_pred == c_lab[:, None], groups)
    return {"spurious_accuracy": ga_s, "class_accuracy": ga_c, "score": ga_s - ga_c, "mean": mean,
            "n_images": n, "n_groups": len(np.unique(groups))}


def corrected_embeddings(run, variants: dict[str, Variant], mean: np.ndarray, basis: np.ndarray,
                         rows=None) -> dict[str, np.ndarray]:
    """One streamed pass: for each variant, the unit embeddings [n, D] of ``run``'s ``rows`` with the
    variant's heads mean-ablated (to ``mean`` [H, D]) and projected (``basis`` [D, r])."""
    mask = _rows_mask(run, rows)
    lo, hi = _head_rows(run)
    out = {name: [] for name in variants}
    for start, pieces in run.iter_pieces():
        keep = mask[start:start + len(pieces)]
        if not keep.any():
            continue
        block = np.asarray(pieces[keep], dtype=np.float64)
        full = block.sum(axis=1)
        heads = block[:, lo:hi]
        for name, v in variants.items():
            e = full.copy()
            if v.ablate:
                e -= (heads[:, v.ablate] - mean[v.ablate][None]).sum(axis=1)
            if v.project:
                p = heads[:, v.project].sum(axis=1)
                e -= (p @ basis) @ basis.T
            out[name].append(e)
    result = {}
    for name, parts in out.items():
        e = np.concatenate(parts) if parts else np.zeros((0, run.dim))
        result[name] = (e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
    return result


def _task(run, model, column: str, role: str):
    from .zeroshot import zero_shot_tasks

    if column not in run.labels:
        raise ClipInterpretError(f"run {run.path} has no label column {column!r} for the {role}; it has: "
                                 f"{', '.join(sorted(run.labels)) or 'none'}")
    tasks = {t.name: t for t in zero_shot_tasks(run, model)}
    if column not in tasks:
        raise ClipInterpretError(f"run {run.path}: column {column!r} is not a zero-shot task (tasks: "
                                 f"{', '.join(tasks)})")
    return tasks[column]


def _labels_as(task, other_task, run) -> np.ndarray:
    """``other_task``'s labels (another run's) as indices into ``task``'s class names."""
    missing = sorted(set(other_task.class_names) - set(task.class_names))
    if missing:
        raise ClipInterpretError(f"run {run.path} has values {', '.join(missing)} of {task.name!r} that the "
                                 "evaluated run does not have")
    index = np.asarray([task.class_names.index(n) for n in other_task.class_names])
    return index[other_task.labels]


def _scores(correct, class_labels, spurious_values, class_names) -> dict:
    from .effects import group_scores

    return group_scores(correct, class_labels, list(spurious_values), class_names)


def debias(run, model, class_column: str, spurious_column: str, k: int | None = None,
           threshold: float | None = None, probe=None, val=None, labelled: list[str] | None = None,
           n_random: int = 5, seed: int = 0, max_k: int = 24, val_fraction: float = 0.5) -> dict:
    """Locate the spurious heads of ``run`` by contrast and correct them; accuracy before and after
    (see the module doc). ``probe``, ``val``: other runs of the same model; ``labelled``: head names
    (``L3.H1``) to compare with."""
    if k is not None and threshold is not None:
        raise ClipInterpretError("give --k or --threshold, not both")
    if k is not None and k < 0:
        raise ClipInterpretError(f"--k must be 0 or more, got {k}")
    if n_random < 0 or max_k < 0:
        raise ClipInterpretError("--random and --max-k must be 0 or more")
    if class_column == spurious_column:
        raise ClipInterpretError("the class and the spurious attribute must be different columns")
    run.check_model(model)
    for other in (probe, val):
        if other is not None:
            other.check_model(model)
            if other.layers != run.layers:
                raise ClipInterpretError(f"run {other.path} analyses layers {other.layers}, run {run.path} "
                                         f"{run.layers}: index both with the same --layers")
    cls, spu = _task(run, model, class_column, "class"), _task(run, model, spurious_column, "spurious attribute")
    names = run.head_names()
    spurious_values = np.asarray(spu.class_names)[spu.labels]

    # the locating split
    eval_rows = np.ones(len(run), bool)
    if val is None and probe is not None:
        val, where = probe, f"the probe run {probe.path}"
    elif val is not None:
        where = f"the validation run {val.path}"
    else:
        if not 0 < val_fraction < 1:
            raise ClipInterpretError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        order = np.random.default_rng(seed).permutation(len(run))
        held = np.zeros(len(run), bool)
        held[order[:int(round(val_fraction * len(run)))]] = True
        if held.all() or not held.any():
            raise ClipInterpretError(f"run {run.path}: too few images to hold out a locating split; give --val RUN")
        eval_rows = ~held
        where = f"{held.sum()} held-out images of {run.path} (not reported)"
    locate_run = val if val is not None else run
    locate_rows = None if val is not None else ~eval_rows
    if val is not None:
        vc, vs = _task(val, model, class_column, "class"), _task(val, model, spurious_column, "spurious attribute")
        v_class, v_spur = _labels_as(cls, vc, val), _labels_as(spu, vs, val)
    else:
        v_class, v_spur = cls.labels, spu.labels
    found = head_scores(locate_run, spu.classes, cls.classes, v_spur, v_class, rows=locate_rows)
    if found["n_groups"] < 2:
        raise ClipInterpretError(f"the locating split ({where}) has a single (class, spurious) group: the contrast "
                                 "needs images where the cue and the class disagree")
    basis = spurious_basis(spu.classes)
    score, mean = found["score"], found["mean"]
    order = [int(i) for i in np.argsort(-score, kind="stable")]

    def correction(ablate):
        ablate = list(ablate)
        return Variant(ablate, [i for i in range(len(names)) if score[i] < 0 and i not in ablate])

    chosen_by = ""
    if threshold is not None:
        located = [i for i in order if score[i] >= threshold]
        chosen_by = f"score >= {threshold}"
    elif k is not None:
        located = order[:k]
        chosen_by = f"top {k}"
    else:  # k chosen on the locating split: best worst-group class accuracy there (the probe's, with a probe)
        positive = [i for i in order if score[i] > 0][:max_k]
        grid = sorted({j for j in (0, 1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 48, 64) if j < len(positive)}
                      | {len(positive)})
        candidates = {str(j): correction(positive[:j]) for j in grid}
        emb = corrected_embeddings(locate_run, candidates, mean, basis, rows=locate_rows)
        values = np.asarray(spu.class_names)[v_spur if locate_rows is None else v_spur[locate_rows]]
        labels = v_class if locate_rows is None else v_class[locate_rows]
        if probe is not None:
            from .probe import fit_probe

            p_labels = _labels_as(cls, _task(probe, model, class_column, "class"), probe)
            train = corrected_embeddings(probe, candidates, mean, basis)
            predict = {j: fit_probe(train[j], p_labels, len(cls.class_names))(e) for j, e in emb.items()}
        else:
            predict = {j: (e @ cls.classes.T).argmax(1) for j, e in emb.items()}
        worst = {j: _scores(predict[j] == labels, labels, values, cls.class_names)["worst_group_accuracy"]
                 for j in emb}
        best = max(worst, key=lambda j: (worst[j], -int(j)))
        located = positive[:int(best)]
        chosen_by = (f"k = {best} chosen on the locating split by its worst-group "
                     f"{'probe' if probe is not None else 'zero-shot'} accuracy, k = "
                     + ", ".join(f"{j}: {worst[j]:.1%}" for j in sorted(worst, key=int)))

    variants = {"unmodified": Variant(), "projection": correction([]), "located": Variant(list(located)),
                "debiased": correction(located)}
    labelled_idx = None
    if labelled:
        unknown = [h for h in labelled if h not in names]
        if unknown:
            raise ClipInterpretError(f"labelled head(s) {', '.join(unknown)} are not among the run's analysed "
                                     f"heads (layers {run.layers})")
        labelled_idx = [names.index(h) for h in labelled]
        variants["labelled"] = Variant(labelled_idx)
    rng = np.random.default_rng(seed)
    others = [i for i in range(len(names)) if i not in located]
    draws = []
    if located and n_random:
        for j in range(n_random):
            pick = [int(i) for i in rng.choice(others, size=min(len(located), len(others)), replace=False)]
            draws.append(pick)
            variants[f"random{j}"] = Variant(pick)
            variants[f"random{j}+projection"] = correction(pick)

    classifiers = {"zero-shot": None}
    if probe is not None:
        pc = _task(probe, model, class_column, "class")
        p_labels = _labels_as(cls, pc, probe)
        train = corrected_embeddings(probe, variants, mean, basis)
        from .probe import fit_probe

        classifiers["probe"] = {name: fit_probe(train[name], p_labels, len(cls.class_names)) for name in variants}
    test = corrected_embeddings(run, variants, mean, basis, rows=eval_rows)
    labels, values = cls.labels[eval_rows], spurious_values[eval_rows]
    s_labels = spu.labels[eval_rows]
    results = {}
    for clf, fitted in classifiers.items():
        results[clf] = {}
        for name, e in test.items():
            predicted = (e @ cls.classes.T).argmax(1) if fitted is None else fitted[name](e)
            results[clf][name] = _scores(predicted == labels, labels, values, cls.class_names)
        for prefix in ("random", "random+projection"):
            keys = [f"random{j}" + prefix[6:] for j in range(len(draws))]
            if keys:
                results[clf][prefix] = {
                    "worst_group_accuracy": float(np.mean([results[clf][x]["worst_group_accuracy"] for x in keys])),
                    "average_accuracy": float(np.mean([results[clf][x]["average_accuracy"] for x in keys])),
                    "draws": len(keys)}
    cue = {name: float(group_balanced_accuracy((e @ spu.classes.T).argmax(1) == s_labels, labels * 100 + s_labels))
           for name, e in test.items() if not name.startswith("random")}
    return {"run": str(run.path), "class": class_column, "spurious": spurious_column,
            "located_on": where, "evaluated_images": int(eval_rows.sum()), "chosen_by": chosen_by,
            "heads": names, "score": [float(x) for x in score],
            "spurious_accuracy": [float(x) for x in found["spurious_accuracy"]],
            "class_accuracy": [float(x) for x in found["class_accuracy"]],
            "located": [names[i] for i in located],
            "class_heads": [names[i] for i in variants["debiased"].project],
            "labelled": [names[i] for i in labelled_idx] if labelled_idx is not None else None,
            "random_draws": [[names[i] for i in d] for d in draws],
            "spurious_zero_shot_accuracy": cue,
            "accuracy": results,
            "probe": str(probe.path) if probe is not None else None}


ROWS = ("unmodified", "projection", "located", "debiased", "labelled", "random", "random+projection")


def format_debias(result: dict) -> str:
    top = sorted(zip(result["heads"], result["score"]), key=lambda x: -x[1])[:8]
    lines = [f"class {result['class']!r}, spurious {result['spurious']!r}; heads located on {result['located_on']}",
             "score = group-balanced zero-shot accuracy of the spurious attribute minus that of the class, from "
             "each head alone; top: " + ", ".join(f"{h} {s:+.2f}" for h, s in top),
             f"located ({result['chosen_by']}): {', '.join(result['located']) or 'none'}",
             f"class heads projected off the spurious direction: {len(result['class_heads'])}",
             f"evaluated on {result['evaluated_images']} images of {result['run']}"]
    for clf, rows in result["accuracy"].items():
        name = clf if clf == "zero-shot" else f"linear probe fitted on {result['probe']}"
        lines.append(f"\n{name}: worst group / average accuracy")
        for row in ROWS:
            if row in rows:
                r = rows[row]
                extra = f"  ({r['worst_group']})" if "worst_group" in r else f"  (mean of {r['draws']} draws)"
                lines.append(f"  {row:<20} {r['worst_group_accuracy']:>7.1%} {r['average_accuracy']:>7.1%}{extra}")
        groups = list(rows["unmodified"]["groups"])
        lines.append(f"  per group: {'group':<26}{'unmodified':>11}{'debiased':>10}")
        for g in groups:
            lines.append(f"             {g:<26}{rows['unmodified']['groups'][g]['accuracy']:>11.1%}"
                         f"{rows['debiased']['groups'][g]['accuracy']:>10.1%}")
    lines.append("\nspurious attribute still decodable (zero-shot, group-balanced): " + ", ".join(
        f"{k} {v:.1%}" for k, v in result["spurious_zero_shot_accuracy"].items()))
    return "\n".join(lines)
