"""A CoCa-like tower (test-vit-tiny-coca: a CLS token, a multi-query attentional pooler of its own width over LN_k of
every token, LN_post on its first query's row; random weights) through decompose, index, the mean-ablation study,
interventions by heads, TextSpan and the spectra of its heads on toy-world images."""

import json

import numpy as np

from clip_interpret.cli import main
from clip_interpret.runstore import open_run


def test_a_coca_tower_is_decomposed_indexed_ablated_and_explained(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path / "cache"))
    from clip_interpret.toyworld import generate

    image = tmp_path / "toy.png"
    generate(3, seed=1).image.save(image)
    assert main(["decompose", "--model", "open_clip:test-vit-tiny-coca", str(image), "--layers", "all",
                 "--text", "a red square", "--spatial", "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert "token embeddings" in out and "pooling MLP" not in out  # the pooler reads every token; it has no MLP
    report = json.loads((tmp_path / "one" / "decomposition.json").read_text())
    assert report["pool"] == "attn-pool"

    run = tmp_path / "run"
    assert main(["index", "--model", "open_clip:test-vit-tiny-coca", "--images", "toyworld:60:1", "--out", str(run),
                 "--layers", "all", "--storage", "fp32", "--workers", "0"]) == 0
    opened = open_run(run)
    assert opened.manifest["model"]["vit"]["pool"] == "attn-pool" and "pool_mlp" not in opened.layout
    assert len(opened.head_names()) == 12  # 3 layers x 4 heads
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
