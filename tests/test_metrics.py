"""Interpretability scores and the ablation check of labels."""

import json

import numpy as np
import pytest

from clip_interpret.faithfulness import confirm_labels, head_ablation_drops
from clip_interpret.metrics import bar_chart, format_comparison, published_scores, scores


def test_scores_on_a_hand_made_model():
    heads = {
        "L0.H0": {"label": "color", "judgements": [True, True, False, True]},   # 3/4
        "L0.H1": {"label": "Colours", "judgements": [True, False]},             # 1/2, same property
        "L0.H2": {"label": "shape", "judgements": [True, True]},                 # 1
        "L0.H3": {"label": None, "judgements": [False, False]},                  # unlabelled: not counted
        "L0.H4": {"label": "animal", "judgements": None},                        # labelled, not judged
    }
    s = scores(heads)
    assert s["association"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert s["entanglement"] == pytest.approx(2 / 4)  # the two colour heads share; shape and animal do not
    assert s["n_labelled"] == 4 and s["n_judged"] == 3 and s["n_heads"] == 5
    assert s["property_heads"] == {"color": ["L0.H0", "L0.H1"], "shape": ["L0.H2"], "animal": ["L0.H4"]}


def test_scores_extremes():
    one_each = scores({"a": "color", "b": "shape", "c": "count"})
    assert one_each["entanglement"] == 0 and one_each["association"] is None
    all_same = scores({"a": "color", "b": "colors", "c": "Colour"})
    assert all_same["entanglement"] == 1 and all_same["n_properties"] == 1
    assert scores({"a": None})["entanglement"] is None


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
    rows = {"a": scores({"x": "color", "y": "color"}), **published_scores()}
    path = bar_chart(rows, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confirm_labels_verdicts():
    drops = {"tasks": ["color", "shape"],
             "drops": {"L0.H0": {"color": 0.5, "shape": 0.1}, "L0.H1": {"color": 0.2, "shape": 0.3},
                       "L0.H2": {"color": 0.0, "shape": -0.1}, "L0.H3": {"color": 0.4, "shape": 0.0}},
             "accuracy_drops": {"L0.H0": {"color": 0.01, "shape": 0.0}, "L0.H1": {"color": 0.0, "shape": 0.0},
                                "L0.H2": {"color": 0.0, "shape": 0.0}, "L0.H3": {"color": 0.0, "shape": 0.0}}}
    out = confirm_labels({"L0.H0": "Colours", "L0.H1": "color", "L0.H2": "color", "L0.H3": "animal"}, drops)
    assert out["heads"]["L0.H0"]["verdict"] == "confirmed" and out["heads"]["L0.H0"]["confirmed_by_accuracy"]
    assert out["heads"]["L0.H1"]["verdict"] == "refuted" and out["heads"]["L0.H1"]["most_hurt"] == "shape"
    assert out["heads"]["L0.H2"]["verdict"] == "refuted"  # no drop at all
    assert out["heads"]["L0.H3"]["verdict"] == "untestable"
    assert (out["testable"], out["confirmed"], out["share_confirmed"]) == (3, 1, pytest.approx(1 / 3))


def test_head_ablation_drops_match_a_direct_computation(toy_textspan_run):
    from clip_interpret.ablation import zero_shot_tasks
    from clip_interpret.index import open_run

    path, model = toy_textspan_run
    run = open_run(path, model)
    drops = head_ablation_drops(run, model)
    tasks = {t.name: t for t in zero_shot_tasks(run, model)}
    emb = run.sum_of_pieces()
    for head in ("L3.H3", "L5.H4"):  # the toy model's colour and background heads (docs/toy-model.md)
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
    # known answer: the colour head hurts colour most, the background head background
    assert max(drops["drops"]["L3.H3"], key=drops["drops"]["L3.H3"].get) == "color"
    assert max(drops["drops"]["L5.H4"], key=drops["drops"]["L5.H4"].get) == "background"
    json.dumps(drops)  # JSON-ready
