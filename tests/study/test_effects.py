"""Direct and total effects on a run's accuracy, per group; linear probes; the spurious toy world."""

import csv
import json

import numpy as np
import pytest

from clip_interpret import load_model
from clip_interpret.cli import main
from clip_interpret.effects import fit_probe, intervention_study, variant_embeddings
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images
from clip_interpret.interventions import Targets
from clip_interpret.toyworld import generate, spurious

TINY = "open_clip:test-vit-tiny"


@pytest.fixture(scope="module")
def model():
    return load_model(TINY, device="cpu")


@pytest.fixture(scope="module")
def spurious_runs(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("spurious")
    spurious(root / "train", 80, seed=10, agree=0.9, progress=False)
    spurious(root / "test", 40, seed=11, agree=0.5, progress=False)
    train = index_images(model, str(root / "train" / "spurious.csv"), root / "runs" / "train", progress=False)
    test = index_images(model, str(root / "test" / "spurious.csv"), root / "runs" / "test", progress=False)
    return root, train, test


def test_spurious_collection_has_the_cue_agreeing_as_asked(tmp_path):
    result = spurious(tmp_path, 400, seed=3, agree=0.9, progress=False)
    with open(result["table"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 400 and set(rows[0]) == {"image", "shape", "background"}
    agree = [(r["shape"] == "circle") == (r["background"] == "white") for r in rows]
    assert 0.85 < np.mean(agree) < 0.95 and result["agreeing"] == sum(agree)
    assert 0.4 < np.mean([r["shape"] == "circle" for r in rows]) < 0.6
    first = generate(0, seed=3, attributes={"shape": rows[0]["shape"], "background": rows[0]["background"]})
    assert np.array_equal(np.asarray(first.image), np.asarray(__import__("PIL.Image").Image.open(
        tmp_path / rows[0]["image"]).convert("RGB")))
    with pytest.raises(ClipInterpretError, match="different properties"):
        spurious(tmp_path / "x", 10, 0, 0.9, core="shape", cue="shape")
    with pytest.raises(ClipInterpretError, match="unknown value"):
        spurious(tmp_path / "x", 10, 0, 0.9, cue_values=("white", "plaid"))


def test_unmodified_variant_is_the_run_and_zero_shot_accuracy_matches(spurious_runs, model):
    _, _, test = spurious_runs
    targets = Targets.parse("L2.H1,MLP2", model.vit.cfg)
    emb = variant_embeddings(test, model, targets, "mean", workers=0)
    assert np.allclose(emb["full"], test.embeddings(), atol=1e-6)
    assert not np.allclose(emb["total"], emb["full"], atol=1e-4)
    result = intervention_study(test, model, targets, groups="background", workers=0)
    from clip_interpret.ablation import zero_shot_tasks

    for task in zero_shot_tasks(test, model):
        expected = ((test.embeddings() @ task.classes.T).argmax(1) == task.labels).mean()
        assert result["accuracy"]["full"][task.name] == pytest.approx(expected)
        groups = result["groups"]["full"][task.name]
        sizes = sum(g["n"] for g in groups["groups"].values())
        assert sizes == len(test)
        assert groups["worst_group_accuracy"] == min(g["accuracy"] for g in groups["groups"].values())


def test_probe_is_fitted_on_the_other_run_and_reported(spurious_runs, model):
    _, train, test = spurious_runs
    result = intervention_study(test, model, Targets.parse("L2.H0", model.vit.cfg), "zero", probe=train,
                                workers=0)
    assert result["classifier"].startswith("linear probe fitted on")
    assert set(result["accuracy"]) == {"full", "direct", "total"}


def test_probe_fits_separable_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 2] > 0).astype(int)
    predict = fit_probe(x, y, 2)
    assert (predict(x) == y).mean() > 0.97


def test_ablate_command_with_targets_groups_and_errors(spurious_runs, capsys):
    root, _, test = spurious_runs
    assert main(["ablate", str(test.path), "--heads", "L2.H1,MLP1", "--groups", "background", "--workers", "0",
                 "--probe", str(root / "runs" / "train")]) == 0
    out = capsys.readouterr().out
    assert "direct effect (mean-ablated)" in out and "worst" in out
    saved = json.loads(next(test.path.glob("intervention-*.json")).read_text())
    assert saved["targets"] == "L2.H1, MLP1" and saved["group_column"] == "background"
    assert main(["ablate", str(test.path), "--groups", "background"]) == 2
    assert "need targets" in capsys.readouterr().err
    assert main(["ablate", str(test.path), "--heads", "L2.H1", "--groups", "weather"]) == 2
    assert "no label set 'weather'" in capsys.readouterr().err
    assert main(["ablate", str(test.path), "--heads", "L7.H0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["ablate", str(test.path), "--property", "color"]) == 2
    assert "labels" in capsys.readouterr().err
