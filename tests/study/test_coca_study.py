"""A CoCa-like tower (test-vit-tiny-coca: a CLS token, a multi-query attentional pooler of its own width over LN_k of
every token, LN_post on its first query's row; random weights) through decompose, the whole study (analyze: index,
ablate, textspan, label, faithfulness, metrics, report), the five analyses, ablation by heads (direct and total
effects), segbench and the app on toy-world images."""

import json
import re

import numpy as np

from clip_interpret.cli import main
from clip_interpret.runstore import open_run


def test_a_coca_tower_goes_through_the_whole_study(tmp_path, capsys, monkeypatch):
    from clip_interpret.app import core
    from clip_interpret.toyworld import generate

    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    query = tmp_path / "query.png"
    generate(3, seed=4).image.save(query)
    assert main(["decompose", "--model", "open_clip:test-vit-tiny-coca", str(query), "--layers", "all",
                 "--text", "a red square", "--spatial", "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "token embeddings" in out and "pooling MLP" not in out  # the pooler reads every token; it has no MLP
    assert json.loads((tmp_path / "one" / "decomposition.json").read_text())["pool"] == "attn-pool"

    run = tmp_path / "run"
    assert main(["analyze", "--model", "open_clip:test-vit-tiny-coca", "--images", "toyworld:100:1", "--out",
                 str(run), "--pool", "toy", "--layers", "all", "--m", "3"]) == 0
    steps = {m.group(1): m.group(2) for m in re.finditer(r"\[\d/7\] (\w+): (.*)", capsys.readouterr().out)}
    assert list(steps) == ["index", "ablate", "textspan", "label", "faithfulness", "metrics", "report"]
    assert all(v.startswith("done") for v in steps.values()), steps
    opened = open_run(run)
    assert opened.manifest["model"]["vit"]["pool"] == "attn-pool" and "pool_mlp" not in opened.layout
    assert len(opened.head_names()) == 12  # 3 layers x 4 heads
    assert np.abs(opened.sum_of_pieces() - opened.embeddings()).max() < 5e-3  # fp16 storage
    assert "<h2>Heat maps" in (run / "report.html").read_text()
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
        if command[0] == "segment":  # the map covers the 5x4 patch grid of the 40x32 images (the CLS token dropped)
            assert len(result["maps"][0]["grid"]) == 5 and len(result["maps"][0]["grid"][0]) == 4
    assert main(["ablate", str(run), "--heads", "L2.H1,L1.H0", "--mode", "mean", "--workers", "0"]) == 0
    out_text = capsys.readouterr().out
    assert "direct effect" in out_text and "total effect" in out_text

    assert main(["segbench", "--model", "open_clip:test-vit-tiny-coca", "--dataset", "toyworld:20:1", "--out",
                 str(tmp_path / "seg"), "--workers", "0"]) == 0
    seg = json.loads(next((tmp_path / "seg").glob("segbench-*.json")).read_text())
    assert len(seg["heads_objects"]) == 12

    registry = core.Registry([run])
    gallery, text = core.run_topic_segmentation(registry, "run", 2, "a red circle", "all heads")
    assert len(gallery) == 2 and "share of the similarity" in text
