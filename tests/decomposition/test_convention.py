"""convention="published": the original code's per-head values, checked against an independent
transcription of its steps on native open_clip towers; recorded in runs and never mixed."""

import json

import numpy as np
import pytest
import torch

from clip_interpret import decompose, load_model
from clip_interpret.errors import ClipInterpretError
from clip_interpret.runstore import index_images, open_run
from clip_interpret.runstore.store import check_same_convention

from tests.helpers import make_open_clip


@torch.no_grad()
def published_transcription(clip, pixels):
    """The original code's steps (clip_text_span: prs_hook.PRSLogger on a forward with
    attn_method="head"), transcribed on hooks of a native open_clip tower.

    Per layer, the CLS query row of each head's output per source token,
    ``A[h][0, m] * W_O[h] v[h, m]``, plus ``b_O / (M * H)``; the "MLP" list is the
    ln_pre output at CLS followed by each block's MLP output at CLS. LN_post's mean and
    ``sqrt(E[x^2] - mean^2 + eps)`` of the pooled CLS row: every one of the 2L+1 entries
    gets ``(gamma * (x - mean / n) / std + beta / n) @ proj`` with n = 2L+1 (and n *= M*H
    for an attention entry), then all is divided by the norm of encode_image's output.
    The original has no LayerScale; here ``ls_1`` multiplies the layer's entries (its
    output bias included) and the MLP entries are read after ``ls_2``.
    Returns attentions [B, L, M, H, D] and mlps [B, L+1, D]."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    assert visual.transformer.batch_first
    seen = {}
    hooks = [visual.ln_pre.register_forward_hook(lambda m, i, o: seen.__setitem__("ln_pre", o)),
             visual.ln_post.register_forward_pre_hook(lambda m, i: seen.__setitem__("ln_post_in", i[0]))]
    for index, block in enumerate(blocks):
        hooks.append(block.ln_1.register_forward_hook(lambda m, i, o, k=index: seen.__setitem__(("ln_1", k), o)))
        hooks.append(block.ls_2.register_forward_hook(lambda m, i, o, k=index: seen.__setitem__(("mlp", k), o)))
    try:
        representation = clip.encode_image(pixels)  # not normalised
    finally:
        for hook in hooks:
            hook.remove()

    attentions = []
    for index, block in enumerate(blocks):
        x = seen[("ln_1", index)]  # [B, N, C]
        _, n, c = x.shape
        heads = block.attn.num_heads
        hd = c // heads
        w_q, w_k, w_v = (block.attn.in_proj_weight[j * c:(j + 1) * c].reshape(heads, hd, c) for j in range(3))
        b_q, b_k, b_v = (block.attn.in_proj_bias[j * c:(j + 1) * c].reshape(1, heads, 1, hd) for j in range(3))
        q = torch.einsum("bnc,hdc->bhnd", x, w_q) + b_q
        k = torch.einsum("bnc,hdc->bhnd", x, w_k) + b_k
        v = torch.einsum("bnc,hdc->bhnd", x, w_v) + b_v
        attn = ((q / hd ** 0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
        extended = torch.einsum("bhnm,bhmc->bnmhc", attn, v)
        out = torch.einsum("bnmhc,dhc->bnmhd", extended, block.attn.out_proj.weight.reshape(c, heads, hd))
        entry = out[:, 0] + block.attn.out_proj.bias / (n * heads)  # [B, M, H, C]
        if hasattr(block.ls_1, "gamma"):
            entry = entry * block.ls_1.gamma
        attentions.append(entry)
    attentions = torch.stack(attentions, dim=1)  # [B, L, M, H, C]
    mlps = torch.stack([seen["ln_pre"][:, 0]] + [seen[("mlp", k)][:, 0] for k in range(len(blocks))], dim=1)

    pooled = seen["ln_post_in"]
    pooled = pooled[:, 0] if pooled.ndim == 3 else pooled
    mean = pooled.mean(dim=-1, keepdim=True)  # [B, 1]
    std = torch.sqrt((pooled ** 2).mean(dim=-1, keepdim=True) - mean ** 2 + visual.ln_post.eps)
    gamma, beta, proj = visual.ln_post.weight, visual.ln_post.bias, visual.proj
    n_entries = attentions.shape[1] + mlps.shape[1]
    spread = attentions.shape[2] * attentions.shape[3]
    wide = (slice(None), slice(None), None, None, None)
    attn_post = gamma * (attentions - mean[wide] / (n_entries * spread)) / std[wide] + beta / (n_entries * spread)
    mlp_post = gamma * (mlps - mean[:, :, None] / n_entries) / std[:, :, None] + beta / n_entries
    norm = representation.norm(dim=-1)
    return (attn_post @ proj) / norm[:, None, None, None, None], (mlp_post @ proj) / norm[:, None, None]


def _pixels(model, n=3, seed=0):
    return torch.randn(n, 3, *model.vit.cfg.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,seed", [("test-vit-tiny", 0), ("test-vit-tiny-ls", 1)])
def test_published_convention_is_the_original_codes_values(arch, seed):
    clip = make_open_clip(arch, seed=seed)
    model = load_model(clip)
    x = _pixels(model)
    attentions, mlps = published_transcription(clip, x)
    n_layers = attentions.shape[1]

    d = decompose(model, x, layers="all", spatial=True, convention="published")
    assert d.convention == "published"
    assert torch.allclose(d.head_tokens, attentions, atol=1e-6)  # per layer, token and head
    assert torch.allclose(d.heads, attentions.sum(2), atol=1e-6)  # what compute_prs.py stores
    assert torch.allclose(d.cls_embed, mlps[:, 0], atol=1e-6)
    assert torch.allclose(d.mlps, mlps[:, 1:], atol=1e-6)
    assert not d.attn_bias.any() and not d.constant.any()  # shared out over the other pieces
    assert (d.total() - d.embedding).abs().max() < 1e-5  # still exact in total

    last = decompose(model, x, layers=[n_layers - 1], convention="published")  # token-summed, other layers whole
    assert torch.allclose(last.heads, attentions[:, -1:].sum(2), atol=1e-6)
    assert torch.allclose(last.other_attn, attentions[:, :-1].sum((2, 3)), atol=1e-6)
    assert (last.total() - last.embedding).abs().max() < 1e-5


def test_the_conventions_agree_in_total_and_differ_per_head(tiny_model):
    x = _pixels(tiny_model)
    ours = decompose(tiny_model, x)
    theirs = decompose(tiny_model, x, convention="published")
    assert ours.convention == "centred"
    assert torch.allclose(ours.embedding, theirs.embedding, atol=1e-7)
    assert torch.allclose(ours.total(), theirs.total(), atol=1e-5)
    assert (ours.heads - theirs.heads).norm() > 0.05 * ours.heads.norm()
    with pytest.raises(ClipInterpretError, match="unknown convention"):
        decompose(tiny_model, x, convention="paper")


def test_runs_record_the_convention_and_refuse_to_mix(tiny_model, tmp_path):
    published = index_images(tiny_model, "toyworld:12:1", tmp_path / "pub", layers="all", storage="fp32",
                             convention="published", progress=False)
    assert json.loads((tmp_path / "pub" / "manifest.json").read_text())["convention"] == "published"
    assert published.convention == "published"
    from clip_interpret.toyworld import generate

    d = decompose(tiny_model, [generate(i, 1).image for i in range(12)], layers="all", convention="published")
    assert np.allclose(published.all_heads(), d.heads.numpy(), atol=1e-6)
    assert np.allclose(published.sum_of_pieces(), published.embeddings(), atol=1e-5)

    with pytest.raises(ClipInterpretError, match="other settings.*convention 'published' vs 'centred'"):
        index_images(tiny_model, "toyworld:12:1", tmp_path / "pub", layers="all", storage="fp32", progress=False)
    centred = index_images(tiny_model, "toyworld:12:1", tmp_path / "ours", layers="all", storage="fp32",
                           progress=False)
    assert centred.convention == "centred"
    old = json.loads((tmp_path / "ours" / "manifest.json").read_text())
    del old["convention"]  # a run written before the option: centred
    (tmp_path / "ours" / "manifest.json").write_text(json.dumps(old))
    assert open_run(tmp_path / "ours").convention == "centred"
    index_images(tiny_model, "toyworld:12:1", tmp_path / "ours", layers="all", storage="fp32", progress=False)
    check_same_convention([tmp_path / "ours", centred])
    with pytest.raises(ClipInterpretError, match="different conventions"):
        check_same_convention([tmp_path / "ours", published])
    from clip_interpret.cli import main

    assert main(["metrics", str(tmp_path / "ours"), str(tmp_path / "pub")]) == 2  # compared runs must agree

    from clip_interpret.analyses import image_neighbours

    for run in (published, centred):  # a query image is decomposed as the run's pieces were
        found = image_neighbours(tiny_model, run, 3, heads=["L2.H1"], k=1)
        row = run.heads(2, 1)[3]
        assert list(found.indices) == [3] and found.scores[0] == pytest.approx(float(row @ row), rel=1e-4)


def test_cli_convention_option_on_decompose_and_index(tmp_path, capsys):
    from PIL import Image

    from clip_interpret.cli import main

    image = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    spec = "open_clip:test-vit-tiny"
    assert main(["decompose", "--model", spec, str(image), "--text", "red", "--convention", "published",
                 "--out", str(tmp_path / "d")]) == 0
    assert "published convention" in capsys.readouterr().out
    report = json.loads((tmp_path / "d" / "decomposition.json").read_text())
    model = load_model(spec)
    d = decompose(model, [str(image)], convention="published")
    scores = d.head_similarity(model.encode_text(["red"]))[0].flatten()
    item = report["images"][0]["texts"][0]
    assert report["convention"] == "published" and item["pieces"]["attn_bias"] == 0
    assert list(item["heads"].values()) == pytest.approx(scores.tolist(), abs=1e-6)
    assert sum(item["pieces"].values()) == pytest.approx(item["similarity"], abs=1e-5)

    assert main(["index", "--model", spec, "--images", "toyworld:8:1", "--out", str(tmp_path / "run"),
                 "--convention", "published"]) == 0
    assert "published convention" in capsys.readouterr().out
    assert open_run(tmp_path / "run").convention == "published"
    assert main(["index", "--model", spec, "--images", "toyworld:8:1", "--out", str(tmp_path / "run")]) == 2
    assert "convention 'published' vs 'centred'" in capsys.readouterr().err


def test_analyze_keeps_an_existing_runs_convention(tmp_path, capsys):
    from clip_interpret.cli import main

    run = tmp_path / "run"
    common = ["--model", "toy", "--images", "toyworld:60:1", "--out", str(run), "--layers", "5"]
    assert main(["index", *common, "--convention", "published"]) == 0
    assert main(["analyze", *common, "--pool", "toy"]) == 0  # no --convention: the run's
    assert "up to date" in capsys.readouterr().out.split("[1/7] index:")[1].splitlines()[0]
    assert open_run(run).convention == "published" and (run / "report.html").is_file()
    assert main(["analyze", *common, "--pool", "toy", "--convention", "centred"]) == 2
    assert "convention 'published' vs 'centred'" in capsys.readouterr().err


def test_the_default_convention_is_written_in_one_place():
    """Every default refers to DEFAULT_CONVENTION (conventions.py, re-exported by decompose): no other
    string literal names it."""
    import ast
    from pathlib import Path

    import clip_interpret
    from clip_interpret.decompose import CONVENTIONS, DEFAULT_CONVENTION

    assert DEFAULT_CONVENTION in CONVENTIONS
    root = Path(clip_interpret.__file__).parent
    found = [f"{path.relative_to(root)}:{node.lineno}" for path in root.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and node.value == DEFAULT_CONVENTION]
    assert len(found) == 2 and all(f.startswith("conventions.py:") for f in found), found  # the two constants


def test_index_images_checks_convention_and_precision_once(tmp_path, monkeypatch):
    import importlib

    import clip_interpret.device as device_module
    import clip_interpret.runstore.build as build_module

    decompose_module = importlib.import_module("clip_interpret.decompose")  # the package's name is the function

    calls = {"precision": 0, "convention": 0}

    def counted(kind, check):
        def wrapper(value):
            calls[kind] += 1
            return check(value)
        return wrapper

    convention = counted("convention", decompose_module.check_convention)
    monkeypatch.setattr(decompose_module, "check_convention", convention)
    monkeypatch.setattr(build_module, "check_convention", convention)
    monkeypatch.setattr(device_module, "check_precision", counted("precision", device_module.check_precision))
    model = load_model(make_open_clip("test-vit-tiny"))
    run = index_images(model, "toyworld:12:1", tmp_path / "run", batch_size=4, progress=False, workers=0,
                       convention="published")  # three batches
    assert len(run) == 12 and run.convention == "published"
    assert calls == {"precision": 1, "convention": 1}  # load_model's precision; index_images' convention
