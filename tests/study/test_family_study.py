"""The rest of the study on the small towers of the families whose own study test stops at TextSpan (CLIPA's
average pooling, EVA01's and Perception Encoder's timm Eva trunks; random weights): analyze's seven steps (index,
ablate, textspan, label, faithfulness, metrics, report), the five analyses, segbench and the app. EVA02 and
CoCa have theirs in test_eva02_study.py and test_coca_study.py."""

import json
import re

import numpy as np
import pytest

from clip_interpret.cli import main
from clip_interpret.runstore import open_run


@pytest.mark.parametrize("config, pool", [("test-vit-tiny-avg", "avg"), ("test-vit-tiny-eva", "cls"),
                                          ("test-vit-tiny-pe", "map")])
def test_a_small_tower_of_each_family_goes_through_the_whole_study(config, pool, tmp_path, capsys, monkeypatch):
    from clip_interpret.app import core
    from clip_interpret.toyworld import generate

    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    query = tmp_path / "query.png"
    generate(3, seed=4).image.save(query)
    run = tmp_path / "run"
    assert main(["analyze", "--model", f"open_clip:{config}", "--images", "toyworld:100:1", "--out",
                 str(run), "--pool", "toy", "--layers", "all", "--m", "3"]) == 0
    steps = {m.group(1): m.group(2) for m in re.finditer(r"\[\d/7\] (\w+): (.*)", capsys.readouterr().out)}
    assert list(steps) == ["index", "ablate", "textspan", "label", "faithfulness", "metrics", "report"]
    assert all(v.startswith("done") for v in steps.values()), steps
    opened = open_run(run)
    vit = opened.manifest["model"]["vit"]
    assert vit["pool"] == pool
    assert np.abs(opened.sum_of_pieces() - opened.embeddings()).max() < 5e-3  # fp16 storage
    assert "<h2>Heat maps" in (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["faithfulness"] and all(f["testable"] > 0 for f in metrics["faithfulness"].values())
    labels = json.loads((run / "labels.json").read_text())["heads"]
    labelled = [h for h, e in labels.items() if e["label"]]
    assert labelled
    n_heads = len(opened.head_names())

    out = tmp_path / "out"
    grid = [vit["image_size"][0] // vit["patch_size"][0], vit["image_size"][1] // vit["patch_size"][1]]
    for command in (["segment", str(run), "--image", str(query), "--text", "a red circle"],
                    ["contrast", str(run), "--run-image", "3", "--text", "a red circle", "--text", "stripes"],
                    ["image-nn", str(run), "--image", str(query), "--head", "L2.H1"],
                    ["text-nn", str(run), "--text", "a blue star", "--head", "L2.H1"],
                    ["property-nn", str(run), "--image", str(query), "--property", labels[labelled[0]]["label"]]):
        assert main([*command, "--out", str(out / command[0])]) == 0, command
        result = json.loads(next((out / command[0]).glob("*.json")).read_text())
        if command[0] == "segment":  # the map covers the patch grid (a class token dropped)
            assert [len(result["maps"][0]["grid"]), len(result["maps"][0]["grid"][0])] == grid

    assert main(["segbench", "--model", f"open_clip:{config}", "--dataset", "toyworld:20:1", "--out",
                 str(tmp_path / "seg"), "--workers", "0"]) == 0
    seg = json.loads(next((tmp_path / "seg").glob("segbench-*.json")).read_text())
    assert len(seg["heads_objects"]) == n_heads

    registry = core.Registry([run])
    gallery, text = core.run_topic_segmentation(registry, "run", 2, "a red circle", "all heads")
    assert len(gallery) == 2 and "share of the similarity" in text
