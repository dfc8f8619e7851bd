"""A Perception-Encoder-layout tower (test-vit-tiny-pe: rotary attention on an xy grid, a LayerNorm before the
blocks, a MAP head over the class and patch tokens, the trunk's head with its bias; random weights) through index,
the mean-ablation study, interventions by heads and TextSpan on toy-world images."""

import json

import numpy as np

from clip_interpret.cli import main
from clip_interpret.runstore import open_run


def test_a_pe_layout_tower_is_indexed_ablated_and_explained(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["index", "--model", "open_clip:test-vit-tiny-pe", "--images", "toyworld:60:1", "--out", str(run),
                 "--layers", "all", "--storage", "fp32", "--workers", "0"]) == 0
    opened = open_run(run)
    vit = opened.manifest["model"]["vit"]
    assert vit["pool"] == "map" and vit["class_token"] and vit["rope"] == "interleaved" and vit["proj_bias"]
    assert "pool_mlp" in opened.layout and len(opened.head_names()) == 12  # 3 layers x 4 heads
    assert np.abs(opened.sum_of_pieces() - opened.embeddings()).max() < 1e-5

    assert main(["ablate", str(run)]) == 0
    ablation = json.loads((run / "ablation.json").read_text())
    assert ablation["n_images"] == 60
    assert main(["ablate", str(run), "--heads", "L2.H1,L1.H0", "--mode", "mean", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "direct effect" in out and "total effect" in out

    assert main(["textspan", str(run), "--pool", "toy", "--m", "3"]) == 0
    textspan = json.loads(next(run.glob("textspan*.json")).read_text())
    assert textspan["run"]["n_images"] == 60 and len(textspan["heads"]) == 12


def test_a_pe_layout_tower_goes_through_the_rest_of_the_study(tmp_path, capsys, monkeypatch):
    """analyze's seven steps (label, faithfulness, metrics and report after the ones above), the five analyses,
    segbench and the app on the PE-layout tower."""
    import re

    from clip_interpret.app import core
    from clip_interpret.toyworld import generate

    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    query = tmp_path / "query.png"
    generate(3, seed=4).image.save(query)
    run = tmp_path / "run"
    assert main(["analyze", "--model", "open_clip:test-vit-tiny-pe", "--images", "toyworld:100:1", "--out",
                 str(run), "--pool", "toy", "--layers", "all", "--m", "3"]) == 0
    steps = {m.group(1): m.group(2) for m in re.finditer(r"\[\d/7\] (\w+): (.*)", capsys.readouterr().out)}
    assert list(steps) == ["index", "ablate", "textspan", "label", "faithfulness", "metrics", "report"]
    assert all(v.startswith("done") for v in steps.values()), steps
    opened = open_run(run)
    assert opened.manifest["model"]["vit"]["pool"] == "map" and "pool_mlp" in opened.layout
    assert np.abs(opened.sum_of_pieces() - opened.embeddings()).max() < 5e-3  # fp16 storage
    assert "<h2>Heat maps" in (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["faithfulness"] and all(f["testable"] > 0 for f in metrics["faithfulness"].values())
    labels = json.loads((run / "labels.json").read_text())["heads"]
    labelled = [h for h, e in labels.items() if e["label"]]
    assert labelled

    out = tmp_path / "out"
    for command in (["segment", str(run), "--image", str(query), "--text", "a red circle"],
                    ["contrast", str(run), "--run-image", "3", "--text", "a red circle", "--text", "stripes"],
                    ["image-nn", str(run), "--image", str(query), "--head", "L2.H1"],
                    ["text-nn", str(run), "--text", "a blue star", "--head", "L2.H1"],
                    ["property-nn", str(run), "--image", str(query), "--property", labels[labelled[0]]["label"]]):
        assert main([*command, "--out", str(out / command[0])]) == 0, command
        result = json.loads(next((out / command[0]).glob("*.json")).read_text())
        if command[0] == "segment":  # the map covers the 4x4 patch grid of the 32x32 images (the CLS token dropped)
            assert len(result["maps"][0]["grid"]) == 4 and len(result["maps"][0]["grid"][0]) == 4

    assert main(["segbench", "--model", "open_clip:test-vit-tiny-pe", "--dataset", "toyworld:20:1", "--out",
                 str(tmp_path / "seg"), "--workers", "0"]) == 0
    seg = json.loads(next((tmp_path / "seg").glob("segbench-*.json")).read_text())
    assert len(seg["heads_objects"]) == 12

    registry = core.Registry([run])
    gallery, text = core.run_topic_segmentation(registry, "run", 2, "a red circle", "all heads")
    assert len(gallery) == 2 and "share of the similarity" in text
