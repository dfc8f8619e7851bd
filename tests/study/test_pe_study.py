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

