"""An EVA02-layout tower (rotary embeddings, a LayerNorm over the heads, SwiGLU with its sub-LN; random weights)
through index, the mean-ablation study, interventions by heads (direct and total effects) and TextSpan on
toy-world images."""

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
