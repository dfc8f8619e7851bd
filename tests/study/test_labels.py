"""Labellers (taxonomy, embedding, manual) and property-name normalisation."""

import json
import shutil

import numpy as np
import pytest

from clip_interpret.errors import ClipInterpretError
from clip_interpret.labels import (head_labels, heads_with_property, label_run, normalise_property, read_labels,
                                   taxonomy_labels, vote)
from clip_interpret.labels.labellers import (Vocabulary, apply_manual, embedding_labels, load_vocabulary,
                                             read_manual)


@pytest.mark.parametrize("raw,want", [
    ("Colors", "color"), ("colour", "color"), ("COLOURS", "color"), ("color", "color"),
    ("Locations", "location"), ("Body Parts", "body part"), ("bodyparts", "body part"),
    ("Activities", "activity"), ("Night-scenes", "night scene"), ("Counting", "count"),
    ("Photography", "photography"), ("Patterns", "pattern"), ("  shapes ", "shape"), ("Glass", "glass"),
    ("Professions", "occupation"), ("Facial expressions", "emotion"),
])
def test_property_names_are_normalised(raw, want):
    assert normalise_property(raw) == want


def test_empty_property_name_is_refused():
    with pytest.raises(ClipInterpretError, match="empty"):
        normalise_property("  ")


def test_vote_weights_by_variance_explained():
    # three small votes for color lose to one large vote for shape
    assert vote(["color", "color", "color", "shape"], [0.1, 0.1, 0.1, 0.5]) == ("shape", pytest.approx(0.5 / 0.8))
    assert vote(["color", "shape"], [0.0, 0.0]) == (None, 0.0)
    assert vote([None, None], [0.3, 0.2]) == (None, 0.0)


def _textspan(heads: dict, tagged=True) -> dict:
    return {"pool": {"name": "test", "hash": "x", "size": 10}, "m": 3, "rank": 8,
            "run": {"fingerprint": "f", "source_hash": "s", "n_images": 10, "layers": [0]},
            "heads": {name: {"texts": [t for t, _, _ in rows], "categories": [c if tagged else None for _, c, _ in rows],
                             "explained": [e for _, _, e in rows], "variance": [e for _, _, e in rows],
                             "indices": list(range(len(rows))), "rank": 8} for name, rows in heads.items()}}


def test_taxonomy_labeller_labels_judges_and_scores_confidence():
    ts = _textspan({
        "L0.H0": [("a red object", "colors", 0.4), ("a blue thing", "Colours", 0.3), ("a circle", "shapes", 0.1)],
        "L0.H1": [("a circle", "shapes", 0.05), ("stripes", "patterns", 0.3), ("a square", "Shape", 0.05)],
    })
    heads = taxonomy_labels(ts)
    assert heads["L0.H0"]["label"] == "color"
    assert heads["L0.H0"]["judgements"] == [True, True, False]
    assert heads["L0.H0"]["confidence"] == pytest.approx(0.7 / 0.8, abs=1e-4)
    assert heads["L0.H1"]["label"] == "pattern"  # one strong pattern text beats two weak shape texts
    assert heads["L0.H1"]["judgements"] == [False, True, False]


def test_taxonomy_labeller_refuses_an_untagged_pool():
    ts = _textspan({"L0.H0": [("a red object", None, 0.4)]}, tagged=False)
    with pytest.raises(ClipInterpretError, match="embedding"):
        taxonomy_labels(ts)


def test_embedding_labeller_assigns_each_text_to_its_nearest_exemplar():
    # a fake encoder: each text is a one-hot vector chosen by a keyword
    axes = {"red": 0, "blue": 0, "colour": 0, "circle": 1, "shape": 1, "stripe": 2, "pattern": 2}

    def encode(texts):
        out = np.zeros((len(texts), 3), np.float32)
        for i, t in enumerate(texts):
            for word, axis in axes.items():
                if word in t:
                    out[i, axis] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    vocab = Vocabulary("test", ["color", "shape", "pattern"], ["colour", "circle shape", "pattern stripe"], [0, 1, 2])
    ts = _textspan({"L0.H0": [("something red", None, 0.2), ("a blue shirt", None, 0.2), ("a circle", None, 0.3)]},
                   tagged=False)
    heads = embedding_labels(ts, vocab, encode)
    assert heads["L0.H0"]["assigned"] == ["color", "color", "shape"]
    assert heads["L0.H0"]["label"] == "color"
    assert heads["L0.H0"]["judgements"] == [True, True, False]


def test_minilm_embedding_labeller_recovers_most_toy_properties():
    """Known answer: the toy pool's descriptions are tagged; the labeller does not see the tags."""
    from clip_interpret.labels.labellers import minilm_encoder, toy_vocabulary
    from clip_interpret.toyworld.pool import toy_pool

    entries = toy_pool()
    ts = {"heads": {f"L0.H{i}": {"texts": [t], "explained": [1.0]} for i, (_, _, t) in enumerate(entries)}}
    heads = embedding_labels(ts, toy_vocabulary(), minilm_encoder())
    right = np.mean([heads[f"L0.H{i}"]["label"] == prop for i, (prop, _, _) in enumerate(entries)])
    assert right > 0.8, right


def test_vocabularies_load(tmp_path):
    toy = load_vocabulary("toy")
    assert set(toy.properties) == {"color", "shape", "size", "count", "position", "background", "pattern"}
    general = load_vocabulary("general")
    assert "color" in general.properties and len(general.exemplars) > 3000
    path = tmp_path / "props.txt"
    path.write_text("# my properties\nColours\tcrimson\nanimals\tdog\nanimals\tcat\nweather\n")
    own = load_vocabulary(str(path))
    assert own.properties == ["color", "animal", "weather"]
    assert [own.properties[o] for o in own.owner] == ["color", "color", "animal", "animal", "animal", "weather"]
    with pytest.raises(ClipInterpretError, match="not found"):
        load_vocabulary(str(tmp_path / "missing.txt"))


def test_manual_labels_in_json_and_tsv(tmp_path):
    names = ["L0.H0", "L0.H1", "L1.H0"]
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"L0.H0": "Colours", "l1.h0": "none"}))
    assert read_manual(js, names) == {"L0.H0": "color", "L1.H0": None}
    tsv = tmp_path / "m.tsv"
    tsv.write_text("# head\tproperty\nL0.H1\tShapes\nL1.H0 animals\n")
    assert read_manual(tsv, names) == {"L0.H1": "shape", "L1.H0": "animal"}


def test_manual_labels_naming_missing_heads_are_refused(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"L9.H0": "color", "L0.H0": "shape"}))
    with pytest.raises(ClipInterpretError, match="L9.H0") as err:
        read_manual(path, ["L0.H0", "L0.H1"])
    assert "L0.H0 .. L0.H1" in str(err.value)


def test_manual_override_recomputes_judgements():
    heads = {"L0.H0": {"label": "color", "confidence": 0.8, "texts": ["a", "b"], "assigned": ["color", "shape"],
                       "judgements": [True, False], "source": "taxonomy", "error": None}}
    out = apply_manual(heads, {"L0.H0": "shape"})
    assert out["L0.H0"]["label"] == "shape" and out["L0.H0"]["source"] == "manual"
    assert out["L0.H0"]["judgements"] == [False, True]
    assert heads["L0.H0"]["label"] == "color"  # the input is not changed


def test_label_run_writes_files_and_manual_wins(toy_textspan_run, tmp_path):
    src, _ = toy_textspan_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    manual = tmp_path / "manual.tsv"
    manual.write_text("L5.H0\tposition\n")
    result = label_run(run_dir, "taxonomy", manual=str(manual), progress=False)
    assert (run_dir / "labels-taxonomy.json").is_file()
    on_disk = read_labels(run_dir)
    assert on_disk["heads"] == json.loads(json.dumps(result["heads"]))
    labels = head_labels(run_dir)
    assert labels["L5.H0"] == "position" and on_disk["heads"]["L5.H0"]["source"] == "manual"
    assert len(on_disk["heads"]) == 48
    # a head whose TextSpan picks give one property more than half of their explained variance is
    # labelled with it (counted here from the TextSpan file, the labeller's input)
    textspan = json.loads((run_dir / "textspan-toy.json").read_text())["heads"]
    majority = {}
    for name, head in textspan.items():
        shares = {}
        for category, share in zip(head["categories"], head["explained"]):
            shares[category] = shares.get(category, 0.0) + max(share, 0.0)
        category, share = max(shares.items(), key=lambda item: item[1])
        if share > 0.5 * sum(shares.values()) and name != "L5.H0":
            majority[name] = category
    assert len(majority) >= 10, majority
    for name, category in majority.items():
        assert labels[name] == category, (name, category, labels[name])
    colour_head = next(name for name, category in majority.items() if category == "color")
    assert colour_head in heads_with_property(labels, "Colours")


def test_label_run_without_textspan_says_what_to_run(tmp_path, toy_textspan_run):
    src, _ = toy_textspan_run
    run_dir = tmp_path / "bare"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("textspan-*.json"))
    with pytest.raises(ClipInterpretError, match="clip-interpret textspan"):
        label_run(run_dir, "taxonomy")
    with pytest.raises(ClipInterpretError, match="no head labels"):
        read_labels(run_dir)
