"""An EVA02-layout tower (rotary embeddings, a LayerNorm over the heads, SwiGLU with its sub-LN; random weights)
through index, the mean-ablation study, interventions by heads (direct and total effects) and TextSpan on
toy-world images; then the whole study (analyze), the five analyses and the app."""

import json

import numpy as np

from clip_interpret.cli import main
from clip_interpret.runstore import open_run


def test_an_eva02_tower_is_indexed_ablated_and_explained(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["index", "--model", "open_clip:test-vit-tiny-eva02", "--images", "toyworld:60:1", "--out", str(run),
                 "--layers", "all", "--storage", "fp32"]) == 0
    opened = open_run(run)
    vit = opened.manifest["model"]["vit"]
    assert (vit["rope"], vit["attn_ln"], vit["glu"], vit["mlp_ln"], vit["pool"]) == ("interleaved", True, True, True,
                                                                                      "cls")
    assert len(opened.head_names()) == 12  # 3 layers x 4 heads
    assert np.abs(opened.sum_of_pieces() - opened.embeddings()).max() < 1e-5

    assert main(["ablate", str(run)]) == 0
    ablation = json.loads((run / "ablation.json").read_text())
    assert ablation["n_images"] == 60
    assert main(["ablate", str(run), "--heads", "L2.H1,L1.H0", "--mode", "mean"]) == 0
    out = capsys.readouterr().out
    assert "direct effect" in out and "total effect" in out

    assert main(["textspan", str(run), "--pool", "toy", "--m", "3"]) == 0
    textspan = json.loads(next(run.glob("textspan*.json")).read_text())
    assert textspan["run"]["n_images"] == 60 and len(textspan["heads"]) == 12


def test_an_eva02_tower_goes_through_the_whole_study(tmp_path, capsys):
    """The same tower through analyze (index, ablate, textspan, label, faithfulness, metrics, report), the five
    analyses and the app's topic segmentation."""
    import re

    from clip_interpret.app import core
    from clip_interpret.toyworld import generate

    run = tmp_path / "run"
    assert main(["analyze", "--model", "open_clip:test-vit-tiny-eva02", "--images", "toyworld:150:1", "--out",
                 str(run), "--pool", "toy", "--layers", "all"]) == 0
    steps = {m.group(1): m.group(2) for m in re.finditer(r"\[\d/7\] (\w+): (.*)", capsys.readouterr().out)}
    assert list(steps) == ["index", "ablate", "textspan", "label", "faithfulness", "metrics", "report"]
    assert all(v.startswith("done") for v in steps.values()), steps
    assert np.abs(open_run(run).sum_of_pieces() - open_run(run).embeddings()).max() < 5e-3  # fp16 storage
    assert "<h2>Heat maps" in (run / "report.html").read_text()
    labels = json.loads((run / "labels.json").read_text())["heads"]
    labelled = [h for h, e in labels.items() if e["label"]]
    assert labelled

    query = tmp_path / "query.png"
    generate(3, seed=4).image.save(query)
    out = tmp_path / "out"
    for command in (["segment", str(run), "--image", str(query), "--text", "a red circle"],
                    ["contrast", str(run), "--run-image", "3", "--text", "a red circle", "--text", "stripes"],
                    ["image-nn", str(run), "--image", str(query), "--head", "L2.H1"],
                    ["text-nn", str(run), "--text", "a blue star", "--head", "L2.H1"],
                    ["property-nn", str(run), "--image", str(query), "--property", labels[labelled[0]]["label"]]):
        assert main([*command, "--out", str(out / command[0])]) == 0, command
        result = json.loads(next((out / command[0]).glob("*.json")).read_text())
        if command[0] == "segment":  # the 4x4 patch grid (the CLS token left out)
            assert len(result["maps"][0]["grid"]) == 4 and len(result["maps"][0]["grid"][0]) == 4

    assert main(["segbench", "--model", "open_clip:test-vit-tiny-eva02", "--dataset", "toyworld:20:1", "--out",
                 str(tmp_path / "seg"), "--workers", "0"]) == 0
    seg = json.loads(next((tmp_path / "seg").glob("segbench-*.json")).read_text())
    assert len(seg["heads_objects"]) == 12

    registry = core.Registry([run])
    gallery, text = core.run_topic_segmentation(registry, "run", 2, "a red circle", "all heads")
    assert len(gallery) == 2 and "share of the similarity" in text
