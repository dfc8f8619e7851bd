"""Heads read from their weights (clip_interpret.spectra): exact spans, the sparse fit, labels, editing, CLI."""

import json

import numpy as np
import pytest
import torch

import clip_interpret as ci
from clip_interpret.errors import ClipInterpretError
from clip_interpret.pools import Pool
from clip_interpret.spectra import edit_head, head_spectra, head_svd, sparse_fit

from tests.helpers import explicit_forward


def _pixels(model, n=3, seed=0):
    size = model.vit.cfg.image_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _head_write_by_hand(vit, z, layer, head):
    """A head's residual write from its results z [B, H, T, d]: its columns of the output projection
    (times LayerScale), without the shared output bias."""
    d = vit.cfg.head_dim
    block = vit.blocks[layer]
    out = z[:, head] @ block.out.weight[:, head * d:(head + 1) * d].T
    return out * block.ls1 if block.ls1 is not None else out


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_ls_model", "map_model"])
def test_a_heads_output_lies_in_the_span_of_its_residual_directions(fixture, request):
    model = request.getfixturevalue(fixture)
    vit = model.vit
    d = vit.cfg.head_dim
    pixels = _pixels(model)
    for layer, head in [(0, 1), (vit.cfg.layers - 1, vit.cfg.heads - 1)]:
        _, cache = vit.run_with_cache(pixels, names_filter=[f"blocks.{layer}.attn.hook_z"])
        out = _head_write_by_hand(vit, cache[f"blocks.{layer}.attn.hook_z"], layer, head).double()
        full = head_svd(vit, layer, head, k=d)["residual"].double()  # [d, width]
        assert full.shape == (d, vit.cfg.width)
        assert torch.allclose(full @ full.T, torch.eye(d, dtype=torch.float64), atol=1e-5)
        rebuilt = out @ full.T @ full
        assert (rebuilt - out).abs().max() <= 1e-5 * max(1.0, out.abs().max().item())
        fewer = head_svd(vit, layer, head, k=d - 1)["residual"].double()
        assert (out @ fewer.T @ fewer - out).abs().max() > 1e-3  # the span needs every direction


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_ls_model"])
def test_a_heads_exact_joint_contribution_lies_in_the_span_of_its_joint_directions(fixture, request):
    """CLS towers: the decomposition's head piece (LN_post's scale frozen per image) is in the span of the
    carried directions: the scale changes the magnitude, never the directions."""
    model = request.getfixturevalue(fixture)
    vit = model.vit
    parts = ci.decompose(model, _pixels(model, n=4), layers="all")
    for layer, head in [(1, 2), (vit.cfg.layers - 1, 0)]:
        piece = parts.heads[:, layer, head].double()
        full = head_svd(vit, layer, head, k=vit.cfg.head_dim)["directions"].double()
        assert (piece @ full.T @ full - piece).abs().max() <= 1e-5 * max(1.0, piece.abs().max().item())


def test_sparse_fit_recovers_a_planted_combination():
    gen = np.random.default_rng(0)
    texts = gen.standard_normal((60, 48))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    planted = 0.6 * texts[7] + 0.3 * texts[21] + 0.1 * texts[40]
    fit = sparse_fit(planted, texts, n_texts=5)
    assert fit.sign == 1 and sorted(fit.indices) == [7, 21, 40]
    weights = dict(zip(fit.indices, np.array(fit.weights) / sum(fit.weights)))
    assert weights[7] == pytest.approx(0.6, abs=1e-6) and weights[21] == pytest.approx(0.3, abs=1e-6)
    assert fit.fit == pytest.approx(1.0, abs=1e-9)
    negated = sparse_fit(-planted, texts, n_texts=5)  # a singular vector's sign is arbitrary
    assert negated.sign == -1 and sorted(negated.indices) == [7, 21, 40] and negated.fit == pytest.approx(1.0)
    capped = sparse_fit(planted, texts, n_texts=1)
    assert capped.indices == [7] and 0.3 < capped.fit < 0.99  # one text captures only part


def test_head_spectra_labels_a_head_by_the_categories_of_its_texts(tiny_model):
    vit = tiny_model.vit
    top = head_svd(vit, 2, 1, k=2)["directions"].numpy()
    gen = np.random.default_rng(1)
    noise = gen.standard_normal((20, top.shape[1]))
    emb = np.concatenate([top, noise]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pool = Pool("planted", [f"text {i}" for i in range(len(emb))], ["colour", "colour"] + ["shape"] * 20)
    result = head_spectra(tiny_model, pool=pool, k=2, text_emb=emb, heads="L2.H1", center=False)
    head = result.heads["L2.H1"]
    assert list(result.heads) == ["L2.H1"] and head.label == "color" and head.confidence > 0.99
    assert [ex.indices for ex in head.explanations] == [[0], [1]]
    assert all(ex.fit == pytest.approx(1.0, abs=1e-5) for ex in head.explanations)
    untagged = head_spectra(tiny_model, pool=Pool("plain", pool.texts, [None] * len(pool.texts)), k=2,
                            text_emb=emb, heads="L2.H1", center=False)
    assert untagged.heads["L2.H1"].label is None


def test_head_spectra_centres_the_texts_by_default(tiny_model):
    """Texts that share a common component: only once it is removed does the planted text fit the
    head's top direction exactly."""
    vit = tiny_model.vit
    top = head_svd(vit, 2, 1, k=1)["directions"][0].numpy().astype(np.float64)
    gen = np.random.default_rng(3)
    others = gen.standard_normal((15, top.shape[0]))
    others -= others.mean(axis=0)
    rows = np.concatenate([top[None] * 4, others - top[None] * 4 / 15])
    common = gen.standard_normal(top.shape[0]) * 3
    emb = (rows + common).astype(np.float32)  # the rows' mean is the common part
    pool = Pool("common", [f"t{i}" for i in range(16)], ["a"] + ["b"] * 15)
    centred = head_spectra(tiny_model, pool=pool, k=1, n_texts=1, text_emb=emb, heads="L2.H1")
    raw = head_spectra(tiny_model, pool=pool, k=1, n_texts=1, text_emb=emb, heads="L2.H1", center=False)
    first = centred.heads["L2.H1"].explanations[0]
    assert first.indices == [0] and first.sign == 1 and first.fit > 0.99
    assert raw.heads["L2.H1"].explanations[0].fit < 0.9
    assert centred.to_json()["center"] is True and raw.to_json()["center"] is False


def test_head_spectra_covers_every_head_and_writes_json(tiny_model):
    emb = np.random.default_rng(2).standard_normal((10, tiny_model.vit.cfg.output_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pool = Pool("p", [f"t{i}" for i in range(10)], ["a"] * 5 + ["b"] * 5)
    result = ci.head_spectra(tiny_model, pool=pool, k=3, text_emb=emb)
    cfg = tiny_model.vit.cfg
    assert len(result.heads) == cfg.layers * cfg.heads
    data = json.loads(json.dumps(result.to_json()))
    first = data["heads"]["L0.H0"]
    assert len(first["directions"]) == 3 and first["label"] in ("a", "b")
    singular = [d["singular"] for d in first["directions"]]
    assert singular == sorted(singular, reverse=True)


def test_head_spectra_refuses_bad_input(tiny_model):
    emb = np.ones((3, 5), dtype=np.float32)
    pool = Pool("p", ["a", "b", "c"], [None] * 3)
    with pytest.raises(ClipInterpretError, match="joint space"):
        head_spectra(tiny_model, pool=pool, text_emb=emb)
    with pytest.raises(ClipInterpretError, match="at least 1"):
        head_spectra(tiny_model, pool=pool, k=0, text_emb=emb)
    with pytest.raises(ClipInterpretError, match="pool not found"):
        head_spectra(tiny_model, pool="/nonexistent/pool.txt")
    same = np.ones((3, tiny_model.vit.cfg.output_dim), dtype=np.float32)
    with pytest.raises(ClipInterpretError, match="centre"):
        head_spectra(tiny_model, pool=pool, text_emb=same)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_ls_model"])
@pytest.mark.parametrize("scale", [0.0, 2.5])
def test_edit_head_scales_the_direction_the_head_writes(fixture, scale, request):
    model = request.getfixturevalue(fixture)
    vit = model.vit
    layer, head = 1, 2
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    direction = head_svd(vit, layer, head, k=2)["writes"][0].double()
    edited = edit_head(model, f"L{layer}.H{head}", direction, scale)
    pixels = _pixels(model, n=2, seed=3)

    def by_hand(name, value):
        # the original forward, the head's own write replaced by hand: its component along the
        # direction scaled, the rest kept
        if name == f"blocks.{layer}.hook_attn_out":
            write = _head_write_by_hand(vit, state["z"], layer, head).double()
            along = (write @ direction)[..., None] * direction
            return (value.double() + (scale - 1) * along).float()
        if name == f"blocks.{layer}.attn.hook_z":
            state["z"] = value
        return value

    state = {}
    expected, _ = explicit_forward(vit, pixels, hook=by_hand)
    got = edited.vit(pixels)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(vit(pixels), expected, atol=1e-3)  # the edit changes the embedding
    for key, value in vit.state_dict().items():  # the original model is untouched
        assert torch.equal(value, before[key])
    if scale == 0.0:
        _, cache = edited.vit.run_with_cache(pixels, names_filter=[f"blocks.{layer}.attn.hook_z"])
        write = _head_write_by_hand(edited.vit, cache[f"blocks.{layer}.attn.hook_z"], layer, head).double()
        assert (write @ direction).abs().max() < 1e-5  # removed


def test_edit_head_refuses_bad_input(tiny_model):
    width = tiny_model.vit.cfg.width
    with pytest.raises(ClipInterpretError, match="does not exist"):
        edit_head(tiny_model, "L9.H0", torch.ones(width), 0.0)
    with pytest.raises(ClipInterpretError, match="bad head name"):
        edit_head(tiny_model, "head 3", torch.ones(width), 0.0)
    with pytest.raises(ClipInterpretError, match="width"):
        edit_head(tiny_model, "L0.H0", torch.ones(width + 1), 0.0)
    with pytest.raises(ClipInterpretError, match="zero"):
        edit_head(tiny_model, "L0.H0", torch.zeros(width), 0.0)


def test_cli_spectra_prints_a_table_per_head_and_writes_json(tmp_path, capsys):
    from clip_interpret.cli import main

    out = tmp_path / "spectra.json"
    assert main(["spectra", "toy", "--k", "2", "--layers", "5", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "L5.H0  label:" in printed and "L5.H7  label:" in printed and "fit=" in printed
    data = json.loads(out.read_text())
    assert sorted(data["heads"]) == [f"L5.H{h}" for h in range(8)] and data["pool"]["name"] == "toy"
    assert all(len(h["directions"]) == 2 and h["label"] for h in data["heads"].values())


def test_cli_spectra_bad_input_is_one_error_line(tmp_path, capsys):
    from clip_interpret.cli import main

    assert main(["spectra", "toy", "--pool", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pool not found") and err.count("\n") == 1
    assert main(["spectra", "toy", "--k", "0"]) == 2
    assert "--k must be at least 1" in capsys.readouterr().err
