"""The clip-interpret command line."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from clip_interpret import decompose, load_model
from clip_interpret.cli import main

TINY = "open_clip:test-vit-tiny"


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, colour in enumerate([(220, 20, 20), (20, 20, 220)]):
        path = tmp_path / f"img{i}.png"
        image = Image.new("RGB", (40, 30), colour)
        image.paste((250, 250, 250), (5, 5, 20, 20))
        image.save(path)
        paths.append(str(path))
    return paths


def test_models_lists_the_paper_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for spec in ("open_clip:ViT-B-16/openai", "open_clip:ViT-L-14/laion2b_s32b_b82k",
                 "open_clip:ViT-B-32/datacomp_m_s128m_b4k"):
        assert spec in out
    assert "ViT-B-16-plus-240" in out and "test-vit-tiny" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "[" in line}
    assert "[map] [timm/ViT-B-16-SigLIP] webli" in lines["ViT-B-16-SigLIP"]
    assert "[cls] [CLIP BPE]" in lines["ViT-bigG-14"] and "[facebook/xlm-v-base]" in lines["ViT-H-14-worldwide"]
    assert not any(name.startswith(("EVA", "PE-", "RN50", "convnext")) for name in lines)


def test_decompose_writes_json_and_heatmaps(images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["decompose", "--model", TINY, *images, "--text", "a red square", "--text", "blue",
                 "--layers", "1,2", "--spatial", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "RANDOM weights" in printed and "top 5 heads" in printed
    report = json.loads((out / "decomposition.json").read_text())
    assert report["layers"] == [1, 2] and report["random_weights"] is True
    assert [e["source"] for e in report["images"]] == images
    # the printed/written numbers are the library's: recompute with the API
    model = load_model(TINY)
    d = decompose(model, images, layers=[1, 2])
    sims = d.similarity(model.encode_text(["a red square", "blue"]))
    for i, entry in enumerate(report["images"]):
        for t, item in enumerate(entry["texts"]):
            assert item["similarity"] == pytest.approx(float(sims[i, t]), abs=1e-6)
            # heads + other pieces add up to the similarity
            assert sum(item["pieces"].values()) == pytest.approx(item["similarity"], abs=1e-5)
            assert sum(item["heads"].values()) == pytest.approx(item["pieces"]["heads"], abs=1e-5)
            png = out / item["heatmap"]
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size[0] > 100
    assert len(list(out.glob("*.png"))) == 4


def test_decompose_without_text_lists_heads_by_norm(images, capsys):
    assert main(["decompose", "--model", TINY, images[0], "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "largest direct effect" in out
    assert sum(line.strip().startswith("L") for line in out.splitlines()) == 3


@pytest.mark.parametrize("argv, message", [
    (["decompose", "--model", "nonsense", "x.png"], "unknown model spec"),
    (["decompose", "--model", TINY, "missing.png"], "missing.png: no such file"),
    (["decompose", "--model", TINY, "IMG", "--layers", "7"], "layer 7 is out of range"),
    (["decompose", "--model", TINY, "IMG", "--spatial"], "give at least one --text"),
    (["decompose", "--model", TINY, "IMG", "--text", ""], "text #1 is empty"),
])
def test_errors_are_messages_not_tracebacks(argv, message, images, capsys):
    argv = [images[0] if a == "IMG" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_skip_bad_images(images, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    assert main(["decompose", "--model", TINY, images[0], str(bad)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["decompose", "--model", TINY, images[0], str(bad), "--skip-bad", "--text", "x"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "broken.jpg" in out and "empty" in out


def test_unwritable_output_folder(images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["decompose", "--model", TINY, images[0], "--out", str(blocker / "sub")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_demo_runs_on_a_given_model(tmp_path, capsys):
    assert main(["demo", "--model", TINY, "--out", str(tmp_path / "demo"), "--n", "60"]) == 0
    assert "RANDOM" in capsys.readouterr().out
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "random weights" in page and page.count("<figure>") == 3


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "clip_interpret", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "decompose" in done.stdout
