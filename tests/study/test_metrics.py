"""Interpretability scores and the ablation check of labels."""

import json

import numpy as np
import pytest

from clip_interpret.errors import ClipInterpretError
from clip_interpret.faithfulness import confirm_labels, head_ablation_drops
from clip_interpret.metrics import bar_chart, format_comparison, published_scores, scores


def test_scores_on_a_hand_made_model():
    heads = {
        "L0.H0": {"label": "color", "judgements": [True, True, True, True]},    # the labeller's own: ignored
        "L0.H1": {"label": "Colours", "judgements": [True, True]},
        "L0.H2": {"label": "shape", "judgements": [True, True]},
        "L0.H3": {"label": None, "judgements": [False, False]},                  # abstained
        "L0.H4": {"label": "animal", "judgements": None},                        # labelled, not judged
        "L0.H5": {"label": None, "error": "L0.H5: timed out"},                   # failed
    }
    judged = {"L0.H0": [True, True, False, True], "L0.H1": [True, False], "L0.H2": [True, True],
              "L0.H3": [True, True]}  # an unlabelled head's judgements do not count
    s = scores(heads, judgements=judged, judge="a judge")
    assert s["association"] == pytest.approx((0.75 + 0.5 + 1.0) / 3) and s["association_judge"] == "a judge"
    assert s["entanglement"] == pytest.approx(2 / 4)  # the two colour heads share; shape and animal do not
    assert (s["n_labelled"], s["n_judged"], s["n_heads"], s["n_abstained"], s["n_failed"]) == (4, 3, 6, 2, 1)
    assert s["property_heads"] == {"color": ["L0.H0", "L0.H1"], "shape": ["L0.H2"], "animal": ["L0.H4"]}
    # without an independent judge there is no association, whatever the labeller said
    assert scores(heads)["association"] is None


def test_scores_extremes():
    one_each = scores({"a": "color", "b": "shape", "c": "count"})
    assert one_each["entanglement"] == 0 and one_each["association"] is None
    all_same = scores({"a": "color", "b": "colors", "c": "Colour"})
    assert all_same["entanglement"] == 1 and all_same["n_properties"] == 1
    assert scores({"a": None})["entanglement"] is None


def test_entanglement_floor_and_chance_by_enumerating_every_labelling():
    """The floor is the least entanglement of any labelling, the chance value the mean over all
    labellings (uniform random labels), both found here by brute force."""
    from itertools import product

    from clip_interpret.metrics import entanglement_chance, entanglement_floor

    for n_heads, n_props in ((1, 3), (3, 3), (4, 3), (5, 2), (6, 4), (7, 3)):
        values = [scores({f"h{i}": f"p{k}" for i, k in enumerate(labels)})["entanglement"]
                  for labels in product(range(n_props), repeat=n_heads)]
        assert entanglement_floor(n_heads, n_props) == pytest.approx(min(values), abs=1e-12), (n_heads, n_props)
        assert entanglement_chance(n_heads, n_props) == pytest.approx(np.mean(values), abs=1e-12), (n_heads, n_props)
    # the figure: 7 properties and 48 labelled heads leave entanglement at least 0.875
    s = scores({f"L{i // 8}.H{i % 8}": ["shape", "color"][i % 2] for i in range(48)}, n_candidates=7)
    assert s["entanglement_floor"] == pytest.approx(0.875)
    assert s["entanglement"] == 1 and s["entanglement_normalised"] == pytest.approx(
        (1 - 0.875) / (s["entanglement_chance"] - 0.875))


def test_published_scores_cover_the_six_models():
    from clip_interpret.labels.llm import published_labels

    raw = published_labels()["models"]
    rows = published_scores()
    assert set(rows) == set(raw)
    for spec, row in rows.items():
        assert row["association"] is None  # no descriptions were published
        assert row["n_labelled"] == len(raw[spec]["head_labels"])
        assert 0 < row["entanglement"] < 1
    # ViT-B-16/openai: the published groups name 11 location heads; our normalised count is at least that
    assert len(rows["open_clip:ViT-B-16/openai"]["property_heads"]["location"]) >= 11
    text = format_comparison(rows)
    assert "n/a" in text and "ViT-L-14/openai" in text


def test_bar_chart_is_a_png(tmp_path):
    row = scores({"x": "color", "y": "color"})
    row["faithfulness"] = {"share_confirmed": 0.5, "chance": {"mean": 0.2, "p95": 0.4, "p_value": 0.01}}
    rows = {"a": row, **published_scores()}
    path = bar_chart(rows, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confirm_labels_verdicts():
    drops = {"tasks": ["color", "shape"],
             "drops": {"L0.H0": {"color": 0.5, "shape": 0.1}, "L0.H1": {"color": 0.2, "shape": 0.3},
                       "L0.H2": {"color": 0.0, "shape": -0.1}, "L0.H3": {"color": 0.4, "shape": 0.0}},
             "accuracy_drops": {"L0.H0": {"color": 0.01, "shape": 0.0}, "L0.H1": {"color": 0.0, "shape": 0.0},
                                "L0.H2": {"color": 0.0, "shape": 0.0}, "L0.H3": {"color": 0.0, "shape": 0.0}}}
    out = confirm_labels({"L0.H0": "Colours", "L0.H1": "color", "L0.H2": "color", "L0.H3": "animal"}, drops,
                         permutations=200)
    assert out["heads"]["L0.H0"]["verdict"] == "confirmed" and out["heads"]["L0.H0"]["confirmed_by_accuracy"]
    assert out["heads"]["L0.H1"]["verdict"] == "refuted" and out["heads"]["L0.H1"]["most_hurt"] == "shape"
    assert out["heads"]["L0.H2"]["verdict"] == "refuted"  # no drop at all
    assert out["heads"]["L0.H3"]["verdict"] == "untestable"
    assert (out["testable"], out["confirmed"], out["share_confirmed"]) == (3, 1, pytest.approx(1 / 3))


def test_relative_verdict_discounts_a_task_every_head_hurts():
    """Every head costs 'size' some margin (a fragile task); L0.H0 costs colour far more than a typical head
    does. The margin rule calls size most hurt; the relative rule (each task's drop over its mean absolute
    drop across the heads) calls colour, the head's specific effect."""
    from clip_interpret.faithfulness import verdict_scores

    rows = {"L0.H0": {"color": 0.4, "size": 0.5}, "L0.H1": {"color": 0.0, "size": 0.5},
            "L0.H2": {"color": 0.0, "size": 0.6}, "L0.H3": {"color": 0.0, "size": -0.4}}
    drops = {"tasks": ["color", "size"], "drops": rows,
             "accuracy_drops": {h: {"color": 0.0, "size": 0.0} for h in rows}}
    labels = {"L0.H0": "color", "L0.H1": "size", "L0.H2": "size"}
    margin = confirm_labels(labels, drops, permutations=50)
    relative = confirm_labels(labels, drops, permutations=50, verdict="relative")
    assert margin["heads"]["L0.H0"]["verdict"] == "refuted" and margin["heads"]["L0.H0"]["most_hurt"] == "size"
    assert relative["heads"]["L0.H0"]["verdict"] == "confirmed" and relative["heads"]["L0.H0"]["most_hurt"] == "color"
    assert relative["heads"]["L0.H1"]["verdict"] == "confirmed"  # a head with only a size drop stays size
    assert (margin["confirmed"], relative["confirmed"]) == (2, 3)
    assert relative["verdict"] == "relative" and relative["chance"]["verdict"] == "relative"
    # the scale is the mean absolute drop over the heads: color 0.1, size 0.5
    scores = verdict_scores(drops, "relative")
    assert scores["L0.H0"] == {"color": pytest.approx(4.0), "size": pytest.approx(1.0)}
    assert scores["L0.H3"]["size"] == pytest.approx(-0.8)
    assert verdict_scores(drops, "margin") is rows
    with pytest.raises(ClipInterpretError, match="unknown verdict rule 'median'"):
        confirm_labels(labels, drops, verdict="median")


def test_confident_labels_turn_low_confidence_labels_into_abstentions():
    from clip_interpret.faithfulness import confident_labels

    heads = {"L0.H0": {"label": "color", "confidence": 0.9}, "L0.H1": {"label": "shape", "confidence": 0.59},
             "L0.H2": {"label": None, "confidence": 0.0}, "L0.H3": {"label": "size"}}  # manual: no confidence
    assert confident_labels(heads) == {"L0.H0": "color", "L0.H1": "shape", "L0.H2": None, "L0.H3": "size"}
    assert confident_labels(heads, 0.6) == {"L0.H0": "color", "L0.H1": None, "L0.H2": None, "L0.H3": "size"}
    with pytest.raises(ClipInterpretError, match=r"min_confidence must be in \[0, 1\], got 1.5"):
        confident_labels(heads, 1.5)


def _random_drops(rng, n_heads: int, tasks: list[str]) -> dict:
    heads = [f"L0.H{h}" for h in range(n_heads)]
    drops = {h: {t: float(rng.normal()) for t in tasks} for h in heads}
    return {"tasks": tasks, "drops": drops, "accuracy_drops": {h: {t: 0.0 for t in tasks} for h in heads}}


def test_shuffled_baseline_matches_every_permutation_enumerated():
    """Mean, 95th percentile and p-value of the shuffled-label share, against the exact
    distribution over all 720 orderings of 6 labels (one of them untestable)."""
    from itertools import permutations

    from clip_interpret.faithfulness import shuffled_baseline

    rng = np.random.default_rng(3)
    drops = _random_drops(rng, 6, ["color", "shape", "size"])
    drops["drops"]["L0.H0"]["color"] = 5.0  # a head that really carries colour
    labels = dict(zip(drops["drops"], ["color", "color", "shape", "size", "shape", "animal"]))
    heads, given = list(labels), list(labels.values())

    def share(assigned):
        ok = [t in drops["tasks"] and drops["drops"][h][t] > 0 and drops["drops"][h][t] == max(drops["drops"][h].values())
              for h, t in zip(heads, assigned)]
        return sum(ok) / 5  # five testable labels

    exact = np.array([share([given[k] for k in order]) for order in permutations(range(6))])
    observed = share(given)
    result = shuffled_baseline(labels, drops, permutations=20000, seed=1)
    assert result["mean"] == pytest.approx(exact.mean(), abs=0.01)
    assert result["p_value"] == pytest.approx((exact >= observed - 1e-12).mean(), abs=0.01)
    assert abs(result["p95"] - np.percentile(exact, 95)) <= 0.2 + 1e-9  # within one label of five
    assert confirm_labels(labels, drops)["share_confirmed"] == pytest.approx(observed)
    # seeded: the seed decides the permutations (the same seed repeats them, other seeds draw others)
    fixed = shuffled_baseline(labels, drops, 300, seed=5)
    assert fixed == shuffled_baseline(labels, drops, 300, seed=5) and fixed["seed"] == 5
    assert len({shuffled_baseline(labels, drops, 300, seed=s)["mean"] for s in range(5, 10)}) > 1


def test_shuffled_baseline_of_perfect_labels_is_far_below_them():
    from clip_interpret.faithfulness import format_share

    tasks = ["color", "shape", "size", "count"]
    heads = [f"L0.H{h}" for h in range(16)]
    drops = {"tasks": tasks, "accuracy_drops": {h: {t: 0.0 for t in tasks} for h in heads},
             "drops": {h: {t: (1.0 if k % 4 == j else 0.1) for j, t in enumerate(tasks)} for k, h in enumerate(heads)}}
    labels = {h: tasks[k % 4] for k, h in enumerate(heads)}
    out = confirm_labels(labels, drops, permutations=500)
    assert out["share_confirmed"] == 1.0
    assert out["chance"]["mean"] == pytest.approx(0.25, abs=0.03)  # each head keeps its label 1 time in 4
    assert out["chance"]["p_value"] == pytest.approx(1 / 501)  # no shuffle reaches 16 of 16
    line = format_share(out)
    assert "16 of 16" in line and "chance" in line and "95th percentile" in line and "p = " in line


def test_head_ablation_drops_match_a_direct_computation(toy_textspan_run):
    from clip_interpret.ablation import zero_shot_tasks
    from clip_interpret.runstore import open_run

    path, model = toy_textspan_run
    run = open_run(path, model)
    drops = head_ablation_drops(run, model)
    tasks = {t.name: t for t in zero_shot_tasks(run, model)}
    emb = run.sum_of_pieces()
    # the heads whose ablation costs colour and background the most margin
    chosen = {name: max(drops["drops"], key=lambda head: drops["drops"][head][name]) for name in ("color", "background")}
    for head in chosen.values():
        layer, h = int(head[1]), int(head[4])
        c = run.heads(layer, h)
        ablated = emb - c + c.mean(axis=0)
        for name in ("color", "background"):
            task = tasks[name]
            full = ((emb @ task.classes.T).argmax(1) == task.labels).mean()
            abl = ((ablated @ task.classes.T).argmax(1) == task.labels).mean()
            assert drops["accuracy_drops"][head][name] == pytest.approx(full - abl, abs=1e-9)
            logits, logits_a = emb @ task.classes.T, ablated @ task.classes.T
            idx = np.arange(len(task.labels))

            def margin(z):
                other = z.copy()
                other[idx, task.labels] = -np.inf
                return z[idx, task.labels] - other.max(1)

            want = (margin(logits) - margin(logits_a)).mean() / margin(logits).std()
            assert drops["drops"][head][name] == pytest.approx(want, rel=1e-3, abs=1e-5)
    # known answer: the head that costs colour the most hurts colour most of all properties, and the same
    # for background
    for name, head in chosen.items():
        assert max(drops["drops"][head], key=drops["drops"][head].get) == name, (name, head, drops["drops"][head])
    json.dumps(drops)  # JSON-ready
