"""Spurious heads located by contrast and corrected (clip_interpret.debias): planted heads, the projection, the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from clip_interpret.debias import (Variant, corrected_embeddings, group_balanced_accuracy, head_scores,
                                   project_out, spurious_basis)
from clip_interpret.errors import ClipInterpretError

D, H, N = 16, 12, 600
SPURIOUS_HEADS, CLASS_HEADS = [2, 7], [4, 9]


class FakeRun:
    """The run-store surface debias reads: pieces [N, P, D] (heads first, then one 'rest' piece), in shards."""

    def __init__(self, pieces, shard=128):
        self.pieces, self.shard = pieces, shard
        self.layout = {"heads": [0, H], "rest": [H, H + 1]}
        self.dim, self.path = pieces.shape[2], "fake"

    def __len__(self):
        return len(self.pieces)

    def iter_pieces(self):
        for start in range(0, len(self.pieces), self.shard):
            yield start, self.pieces[start:start + self.shard]


def planted(seed=0, agree=0.9):
    """Texts (orthonormal directions), labels with the cue agreeing with the class in ``agree`` of the
    images, and heads: 2 and 7 write the cue, 4 and 9 the class (plus a trace of the cue, below the noise), the rest noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(D, D)))[0]
    class_texts, cue_texts = basis[:, [0, 1]].T, basis[:, [2, 3]].T
    y = rng.integers(2, size=N)
    s = np.where(rng.random(N) < agree, y, 1 - y)
    pieces = rng.normal(scale=0.05, size=(N, H + 1, D))
    for h in SPURIOUS_HEADS:
        pieces[:, h] += cue_texts[s] + 0.3
    for h in CLASS_HEADS:
        pieces[:, h] += class_texts[y] + 0.01 * cue_texts[s]
    return FakeRun(pieces), class_texts, cue_texts, y, s


def test_located_heads_are_exactly_the_planted_ones():
    run, class_texts, cue_texts, y, s = planted()
    found = head_scores(run, cue_texts, class_texts, s, y)
    top = sorted(np.argsort(-found["score"])[:2].tolist())
    assert top == SPURIOUS_HEADS
    assert sorted(np.flatnonzero(found["score"] >= 0.25).tolist()) == SPURIOUS_HEADS
    assert sorted(np.flatnonzero(found["score"] <= -0.25).tolist()) == CLASS_HEADS
    # a cue head reads the cue in every group and the class at chance once the groups are balanced
    assert found["spurious_accuracy"][2] > 0.99 and abs(found["class_accuracy"][2] - 0.5) < 0.05
    assert np.allclose(found["mean"], run.pieces[:, :H].mean(0))


def test_plain_accuracy_would_not_tell_the_cue_from_the_class():
    """Why the contrast balances groups: on the biased split, a cue head predicts the class 90% of the time."""
    run, class_texts, cue_texts, y, s = planted()
    c = run.pieces[:, 2] - run.pieces[:, 2].mean(0)
    read = (c @ cue_texts.T).argmax(1)  # what the head says, taken as the class (the cue's values in class order)
    assert 0.85 < (read == y).mean() < 0.95
    balanced = group_balanced_accuracy(read == y, y * 2 + s)
    assert abs(balanced - 0.5) < 0.01


def test_rows_mask_scores_only_those_rows():
    run, class_texts, cue_texts, y, s = planted()
    rows = np.zeros(N, bool)
    rows[::3] = True
    found = head_scores(run, cue_texts, class_texts, s, y, rows=rows)
    assert found["n_images"] == rows.sum() and np.allclose(found["mean"], run.pieces[rows, :H].mean(0))


def test_projection_removes_the_planted_direction():
    rng = np.random.default_rng(1)
    texts = rng.normal(size=(2, D))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    basis = spurious_basis(texts)
    assert basis.shape == (D, 1)
    direction = (texts[1] - texts[0]) / np.linalg.norm(texts[1] - texts[0])
    c = rng.normal(size=(50, D)) + 3 * direction
    out = project_out(c, basis)
    assert np.abs(out @ direction).max() < 1e-6
    assert np.allclose(out, c - np.outer(c @ direction, direction), atol=1e-10)  # nothing else changes
    with pytest.raises(ClipInterpretError, match="identical"):
        spurious_basis(np.stack([texts[0], texts[0]]))


def test_corrected_embeddings_ablate_and_project():
    run, class_texts, cue_texts, y, s = planted()
    mean = run.pieces[:, :H].mean(0)
    basis = spurious_basis(cue_texts)
    out = corrected_embeddings(run, {"none": Variant(), "fix": Variant(SPURIOUS_HEADS, CLASS_HEADS)}, mean, basis)
    full = run.pieces.sum(1)
    assert np.allclose(out["none"], full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-6)
    expected = full - (run.pieces[:, SPURIOUS_HEADS] - mean[SPURIOUS_HEADS]).sum(1)
    for h in CLASS_HEADS:
        expected -= run.pieces[:, h] - project_out(run.pieces[:, h], basis)
    assert np.allclose(out["fix"], expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    # the cue can no longer be read from the corrected embedding (its only carriers are gone)
    cue = (out["fix"] @ cue_texts.T).argmax(1) == s
    assert abs(group_balanced_accuracy(cue, y * 2 + s) - 0.5) < 0.1
    assert ((out["none"] @ cue_texts.T - (out["none"] @ cue_texts.T).mean(0)).argmax(1) == s).mean() > 0.99


def test_cli_debias_on_a_tiny_spurious_collection(tmp_path):
    from clip_interpret import load_model
    from clip_interpret.cli import main
    from clip_interpret.runstore import index_images
    from clip_interpret.toyworld import spurious

    model = load_model("toy")
    for split, n, seed, agree in (("train", 120, 10, 0.9), ("test", 100, 11, 0.5)):
        spurious(tmp_path / split, n, seed, agree, progress=False)
        index_images(model, str(tmp_path / split / "spurious.csv"), tmp_path / f"run-{split}", layers="all",
                     progress=False)
    out = tmp_path / "debias.json"
    code = main(["debias", str(tmp_path / "run-test"), "--class", "shape", "--spurious", "background", "--k", "2",
                 "--probe", str(tmp_path / "run-train"), "--random", "2", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["located"]) == 2 and result["located_on"].startswith("the probe run")
    ranked = sorted(zip(result["score"], result["heads"]), reverse=True)
    assert result["located"] == [h for _, h in ranked[:2]]
    for clf in ("zero-shot", "probe"):
        rows = result["accuracy"][clf]
        assert {"unmodified", "projection", "located", "debiased", "random", "random+projection"} <= set(rows)
        assert rows["random"]["draws"] == 2
        groups = rows["unmodified"]["groups"]
        assert sum(g["n"] for g in groups.values()) == 100 and len(groups) == 4
    # unmodified zero-shot is the run's stored embeddings classified by the class texts
    from clip_interpret.runstore import open_run
    from clip_interpret.zeroshot import zero_shot_tasks

    test = open_run(tmp_path / "run-test")
    task = {t.name: t for t in zero_shot_tasks(test, model)}["shape"]
    expected = ((test.embeddings() @ task.classes.T).argmax(1) == task.labels).mean()
    assert result["accuracy"]["zero-shot"]["unmodified"]["average_accuracy"] == pytest.approx(expected, abs=0.011)
    # no --probe, no --val: half the run locates, the other half is reported
    assert main(["debias", str(tmp_path / "run-test"), "--class", "shape", "--spurious", "background",
                 "--random", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["evaluated_images"] == 50 and "held-out" in result["located_on"]
    assert main(["debias", str(tmp_path / "run-test"), "--class", "shape", "--spurious", "weather"]) == 2


def test_cli_debias_bad_input_is_one_line(tmp_path, capsys):
    from clip_interpret.cli import main

    assert main(["debias", str(tmp_path), "--class", "shape", "--spurious", "background"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-m", "clip_interpret", "debias", "x", "--class", "a", "--spurious", "b",
                           "--k", "1", "--threshold", "0.1"], capture_output=True, text=True)
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


def test_public_name_is_the_function_even_after_the_submodule_is_imported():
    import importlib

    import clip_interpret as ci

    module = importlib.import_module("clip_interpret.debias")  # the submodule (``import ... as`` would give ci.debias)
    assert ci.debias is module.debias and callable(ci.debias)
    assert "debias" in dir(ci)


def test_debias_on_an_attention_pooled_tower(tmp_path, map_model):
    """SigLIP's layout (no CLS token, MAP pooling): the run's pieces still sum to its embeddings, so
    locating and correcting read them the same way; the unmodified row is the stored embeddings'."""
    from clip_interpret.debias import debias
    from clip_interpret.runstore import index_images, open_run
    from clip_interpret.toyworld import spurious
    from clip_interpret.zeroshot import zero_shot_tasks

    for split, n, seed, agree in (("train", 80, 20, 0.9), ("test", 80, 21, 0.5)):
        spurious(tmp_path / split, n, seed, agree, progress=False)
        index_images(map_model, str(tmp_path / split / "spurious.csv"), tmp_path / f"run-{split}", layers="all",
                     storage="fp32", progress=False)
    test = open_run(tmp_path / "run-test")
    result = debias(test, map_model, "shape", "background", k=2, probe=open_run(tmp_path / "run-train"),
                    n_random=1)
    assert len(result["located"]) == 2 and len(result["heads"]) == 3 * 4
    task = {t.name: t for t in zero_shot_tasks(test, map_model)}["shape"]
    expected = ((test.embeddings() @ task.classes.T).argmax(1) == task.labels).mean()
    assert result["accuracy"]["zero-shot"]["unmodified"]["average_accuracy"] == pytest.approx(expected, abs=1 / 80 + 1e-9)  # one near-tie
