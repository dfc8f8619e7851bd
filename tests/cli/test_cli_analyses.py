"""The analysis subcommands: PNG + JSON per analysis, and one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from clip_interpret import analyses, cli
from clip_interpret.runstore import index_images
from clip_interpret.toyworld import generate


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def main(monkeypatch, model):
    from clip_interpret import models

    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec, **kw: model if spec == "toy" else real(spec, **kw))  # load once
    return cli.main


@pytest.fixture(scope="module")
def model(toy_model):
    return toy_model


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-analyses") / "run"
    index_images(model, "toyworld:120:1", path, progress=False)
    (path / "labels.json").write_text(json.dumps({"labeller": "manual", "heads": {
        "L5.H2": {"label": "shape"}, "L4.H0": {"label": "shapes"}, "L3.H3": {"label": "color"}}}))
    return path


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    path = tmp_path_factory.mktemp("query") / "query.png"
    generate(7, seed=3).image.save(path)
    return path


def _outputs(out):
    pngs, jsons = sorted(out.glob("*.png")), sorted(out.glob("*.json"))
    assert len(pngs) == 1 and len(jsons) == 1 and Image.open(pngs[0]).size[0] > 300
    return json.loads(jsons[0].read_text())


def test_each_analysis_writes_png_and_json(main, model, run_dir, query, tmp_path, capsys):
    from clip_interpret.runstore import open_run

    run = open_run(run_dir)
    out = tmp_path / "p"
    assert main(["property-nn", str(run_dir), "--image", str(query), "--property", "Shape", "--out", str(out)]) == 0
    data = _outputs(out)
    expected = analyses.property_neighbours(model, run, str(query), "shape")
    assert data["heads"] == ["L4.H0", "L5.H2"] and [n["index"] for n in data["neighbours"]] == list(expected.indices)

    out = tmp_path / "i"
    assert main(["image-nn", str(run_dir), "--run-image", "11", "--head", "L3.H3", "--metric", "cosine",
                 "--out", str(out)]) == 0
    data = _outputs(out)
    assert len(data["neighbours"]) == 8 and data["neighbours"][0]["index"] == 11

    out = tmp_path / "t"
    assert main(["text-nn", str(run_dir), "--text", "a green star", "--heads", "L5.H2,L2.H1", "--out", str(out)]) == 0
    data = _outputs(out)
    expected = analyses.text_neighbours(model, run, "a green star", ["L5.H2", "L2.H1"])
    assert [n["index"] for n in data["neighbours"]] == list(expected.indices)
    assert np.allclose([n["score"] for n in data["neighbours"]], expected.scores, atol=1e-7)

    out = tmp_path / "s"
    assert main(["segment", str(run_dir), "--image", str(query), "--text", "a circle", "--out", str(out)]) == 0
    data = _outputs(out)
    assert data["heads_label"] == "all heads" and len(data["maps"][0]["grid"]) == model.vit.cfg.grid[0]

    out = tmp_path / "c"
    assert main(["contrast", str(run_dir), "--image", str(query), "--text", "red", "--text", "blue",
                 "--heads", "L4.H4", "--out", str(out)]) == 0
    data = _outputs(out)
    a, b = (np.array(m["grid"]) for m in data["maps"])
    assert data["heads"] == ["L4.H4"] and np.array_equal(a, -b)
    printed = capsys.readouterr().out
    assert "shared scale" in printed and "image 11" in printed


@pytest.mark.parametrize("argv, message", [
    (["contrast", "RUN", "--run-image", "0", "--text", "red"], "exactly two texts"),
    (["property-nn", "RUN", "--run-image", "0", "--property", "animals"], "carries the property 'animals'"),
    (["image-nn", "RUN", "--run-image", "0", "--head", "L1.H0"], "outside the analysed layers"),
    (["text-nn", "RUN", "--text", " ", "--head", "L5.H0"], "text is empty"),
    (["segment", "RUN", "--image", "NOTANIMAGE", "--text", "red"], "cannot read image"),
])
def test_errors_are_one_line(main, run_dir, tmp_path, capsys, argv, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    argv = [str(run_dir) if a == "RUN" else str(bad) if a == "NOTANIMAGE" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["image-nn", "RUN", "--run-image", "0", "--head", "L5.H0", "--k", "0"], "k must be at least 1"),
    (["image-nn", "RUN", "--run-image", "120", "--head", "L5.H0"], "there is no image 120"),
    (["image-nn", "RUN", "--image", "missing.png", "--head", "L5.H0"], "missing.png: no such file"),
    (["text-nn", "RUN", "--text", "red", "--head", "L9.H0"], "outside the analysed layers"),
    (["segment", "RUN", "--run-image", "0", "--text", ""], "text is empty"),
    (["contrast", "RUN", "--run-image", "0", "--text", "red", "--text", " "], "text is empty"),
    (["property-nn", "RUN", "--run-image", "0", "--property", "animals"], "carries the property 'animals'"),
])
def test_arguments_are_checked_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch, argv, message):
    from clip_interpret import models

    def no_model(spec, **kw):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_model)
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_a_huge_k_is_capped_with_a_warning(main, run_dir, tmp_path, capsys):
    assert main(["image-nn", str(run_dir), "--run-image", "3", "--head", "L4.H1", "--k", "100000000",
                 "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"warning: k=100000000 is more than {analyses.MAX_K}" in captured.err  # one line, as it happens
    out = captured.out
    assert f"{analyses.MAX_K:>3}. image" in out and len(json.loads(next(tmp_path.glob("*.json")).read_text())[
        "neighbours"]) == analyses.MAX_K
    assert Image.open(next(tmp_path.glob("*.png"))).size[0] <= 2000


def test_app_command_defaults_to_this_machine():
    args = cli.build_parser().parse_args(["app", "runs/a", "runs/b"])
    assert args.runs == ["runs/a", "runs/b"] and args.host == "127.0.0.1" and args.max_upload_mb == 10
