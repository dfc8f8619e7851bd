"""The decomposition is exact, and each piece equals its definition computed the slow way."""

import numpy as np
import pytest
import torch
from PIL import Image

from clip_interpret import decompose, load_model
from clip_interpret.decompose import resolve_layers
from clip_interpret.errors import ClipInterpretError, ImageLoadError

from tests.helpers import explicit_forward, make_open_clip

LAYER_CHOICES = [None, "all", [0], [-1], [0, 2], "1,2"]


def pixels_for(model, n=3, seed=0):
    return torch.randn(n, 3, *model.vit.cfg.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("layers", LAYER_CHOICES)
def test_pieces_sum_to_the_unit_embedding(tiny_model, tiny_ls_model, avg_model, layers, spatial):
    for model in (tiny_model, tiny_ls_model, avg_model):
        x = pixels_for(model)
        d = decompose(model, x, layers=layers, spatial=spatial)
        native = model.encode_image(x)
        assert torch.allclose(d.embedding, native, atol=1e-6)
        assert (d.total() - d.embedding).abs().max() < 1e-5
        n_layers = model.vit.cfg.layers
        assert sorted(d.layers + d.other_layers) == list(range(n_layers))
        assert d.mlps.shape[1] == n_layers


def test_real_architecture_spatial_all_layers_is_exact():
    model = load_model(make_open_clip("ViT-B-16"))
    x = pixels_for(model, n=1)
    d = decompose(model, x, layers="all", spatial=True)
    assert d.head_tokens.shape == (1, 12, 197, 12, 512) and d.heads.shape == (1, 12, 12, 512)
    assert (d.total() - d.embedding).abs().max() < 1e-5
    summed = decompose(model, x)  # last 4 layers, token-summed
    assert torch.allclose(d.head_tokens[:, 8:].sum(2), summed.heads, atol=1e-6)
    assert torch.allclose(d.heads[:, 8:], summed.heads, atol=1e-6)


def naive_pieces(vit, pixels):
    """Every piece from its definition, via the explicit cached forward."""
    emb, cache = explicit_forward(vit, pixels)
    cfg = vit.cfg
    avg = cfg.pool == "avg"  # the pooled row: the mean of the patch rows, else the CLS row

    def row(t):  # [B, T, ...] -> the pooled row [B, ...]
        return t[:, 1:].sum(dim=1) / (t.shape[1] - 1) if avg else t[:, 0]

    sigma = cache["ln_post.hook_scale"]
    norm = emb.norm(dim=-1)

    def to_joint(c):  # centre by own mean, gamma, /sigma, project, /|emb|
        centred = c - c.mean(dim=-1, keepdim=True)
        out = (centred * vit.ln_post.weight) @ vit.proj
        return out / (sigma * norm).view(-1, *([1] * (out.ndim - 1)))

    heads = []
    for layer, block in enumerate(vit.blocks):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [B, H, T, T]
        pattern = pattern[:, :, 1:].mean(dim=2) if avg else pattern[:, :, 0]  # [B, H, T]: the pooled query row
        v = cache[f"blocks.{layer}.attn.hook_v"]  # [B, H, T, d]
        per = []
        for h in range(cfg.heads):
            w_o = block.out.weight[:, h * cfg.head_dim:(h + 1) * cfg.head_dim]
            c = pattern[:, h, :, None] * (v[:, h] @ w_o.T)  # [B, T, width]
            if block.ls1 is not None:
                c = c * block.ls1
            per.append(to_joint(c))
        heads.append(torch.stack(per, dim=2))  # [B, T, H, D]
    bias = [to_joint((block.out.bias * (block.ls1 if block.ls1 is not None else 1)).expand(pixels.shape[0], -1))
            for block in vit.blocks]
    return dict(
        heads=torch.stack(heads, dim=1),
        attn=[to_joint(row(cache[f"blocks.{l}.hook_attn_out"])) for l in range(cfg.layers)],
        bias=bias,
        mlps=torch.stack([to_joint(row(cache[f"blocks.{l}.hook_mlp_out"])) for l in range(cfg.layers)], dim=1),
        cls=to_joint(row(cache["hook_embed"])),
        constant=(vit.ln_post.bias @ vit.proj) / norm[:, None],
    )


@pytest.mark.parametrize("which", ["tiny_model", "tiny_ls_model", "avg_model"])
def test_each_piece_equals_its_definition(which, request):
    model = request.getfixturevalue(which)
    x = pixels_for(model, n=2, seed=3)
    ref = naive_pieces(model.vit, x)
    d = decompose(model, x, layers=[0, 2], spatial=True)
    atol = 1e-6
    assert torch.allclose(d.head_tokens, ref["heads"][:, [0, 2]], atol=atol)
    assert torch.allclose(d.heads, ref["heads"][:, [0, 2]].sum(2), atol=atol)
    assert torch.allclose(d.attn_bias, torch.stack([ref["bias"][0], ref["bias"][2]], 1), atol=atol)
    others = [l for l in range(model.vit.cfg.layers) if l not in (0, 2)]
    assert d.other_layers == others
    assert torch.allclose(d.other_attn, torch.stack([ref["attn"][l] for l in others], 1), atol=atol)
    assert torch.allclose(d.mlps, ref["mlps"], atol=atol)
    assert torch.allclose(d.cls_embed, ref["cls"], atol=atol)
    assert torch.allclose(d.constant, ref["constant"], atol=atol)


def test_token_summed_heads_equal_spatial_heads_summed(tiny_ls_model):
    x = pixels_for(tiny_ls_model)
    flat = decompose(tiny_ls_model, x, layers="all")
    spatial = decompose(tiny_ls_model, x, layers="all", spatial=True)
    assert torch.allclose(flat.heads, spatial.head_tokens.sum(2), atol=1e-6)
    assert torch.allclose(flat.heads, spatial.heads, atol=1e-6)  # heads is [B, L, H, D] either way
    assert flat.head_tokens is None and not flat.spatial and spatial.spatial


def test_similarity_splits_additively(tiny_model):
    x = pixels_for(tiny_model)
    texts = tiny_model.encode_text(["a red square", "a dog", "stripes"])
    d = decompose(tiny_model, x, spatial=True)
    full = d.similarity(texts)
    assert torch.allclose(full, d.embedding @ texts.T)
    by_piece = sum((p @ texts.T).sum(1) for name, p in d.pieces().items() if name != "heads")
    by_head = d.head_similarity(texts).sum(dim=(1, 2))
    assert torch.allclose(by_head + by_piece, full, atol=1e-5)
    # per-token shares of all heads add up to the heads' total share
    assert torch.allclose(d.token_similarity(texts).sum(1), by_head, atol=1e-5)


def test_head_selection_and_maps(tiny_model):
    x = pixels_for(tiny_model, n=2)
    text = tiny_model.encode_text(["a cat"])
    d = decompose(tiny_model, x, layers=[1, 2], spatial=True)
    per_head = d.head_similarity(text)  # [B, L, H, 1]
    one = d.token_similarity(text, heads=["L2.H3"])
    assert torch.allclose(one.sum(1), per_head[:, 1, 3], atol=1e-6)
    two = d.token_similarity(text, heads=["L2.H3", (1, 0)])
    assert torch.allclose(two.sum(1), per_head[:, 1, 3] + per_head[:, 0, 0], atol=1e-6)
    grid = d.similarity_maps(text, heads=["L2.H3"], upsample=False)
    assert grid.shape == (2, 1, 4, 4)
    assert torch.allclose(grid.flatten(2).transpose(1, 2), one[:, 1:], atol=1e-7)
    up = d.similarity_maps(text)
    assert up.shape == (2, 1, 32, 32)
    # bilinear upsampling keeps the map's scale: its mean stays near the patch mean
    patches = d.similarity_maps(text, upsample=False)
    assert torch.allclose(up.mean(dim=(2, 3)), patches.mean(dim=(2, 3)), atol=0.2 * patches.abs().max())


def test_top_heads_are_the_largest_shares(tiny_model):
    x = pixels_for(tiny_model, n=2)
    texts = tiny_model.encode_text(["a", "b"])
    d = decompose(tiny_model, x)
    scores = d.head_similarity(texts)
    top = d.top_heads(texts, k=3)
    for i in range(2):
        for t in range(2):
            values = [score for _, score in top[i][t]]
            assert values == sorted(values, reverse=True)
            flat = scores[i, ..., t].flatten()
            assert values[0] == pytest.approx(float(flat.max()))
            best = int(flat.argmax())
            assert top[i][t][0][0] == d.head_names[best]


def test_batching_does_not_change_results(tiny_model):
    x = pixels_for(tiny_model, n=5)
    a = decompose(tiny_model, x, batch_size=2)
    b = decompose(tiny_model, x, batch_size=32)
    assert torch.allclose(a.heads, b.heads, atol=1e-6)
    assert torch.allclose(a.embedding, b.embedding, atol=1e-6)


def test_images_from_files_and_pil_match_preprocessed_tensor(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(2)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(a).save(paths[-1])
    from_files = decompose(tiny_model, [str(p) for p in paths])
    from_pil = decompose(tiny_model, [Image.fromarray(a) for a in arrays])
    pixels = tiny_model.preprocess.batch([Image.fromarray(a) for a in arrays])
    from_tensor = decompose(tiny_model, pixels)
    assert torch.allclose(from_files.heads, from_tensor.heads, atol=1e-6)
    assert torch.allclose(from_pil.embedding, from_tensor.embedding, atol=1e-6)
    assert from_files.sources == [str(p) for p in paths]


def test_bad_image_in_batch_raise_or_skip(tiny_model, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        decompose(tiny_model, [str(good), str(bad)])
    d = decompose(tiny_model, [str(bad), str(good)], on_error="skip")
    assert d.embedding.shape[0] == 1 and d.sources == [str(good)]
    assert len(d.failures) == 1 and d.failures[0].source == str(bad) and d.failures[0].index == 0


@pytest.mark.parametrize("layers, message", [
    ([3], "layer 3 is out of range: the model has 3 layers"),
    ([-4], "out of range"),
    ("8,x", "bad layer list"),
    ([], "no layers"),
])
def test_layer_errors(tiny_model, layers, message):
    with pytest.raises(ClipInterpretError, match=message):
        decompose(tiny_model, pixels_for(tiny_model, n=1), layers=layers)


def test_default_layers_are_the_last_four():
    assert resolve_layers(None, 12) == [8, 9, 10, 11]
    assert resolve_layers(None, 24) == [20, 21, 22, 23]
    assert resolve_layers(None, 3) == [0, 1, 2]
    assert resolve_layers([-1, 11, 0], 12) == [0, 11]


def test_empty_inputs_and_bad_heads(tiny_model):
    with pytest.raises(ClipInterpretError, match="empty"):
        decompose(tiny_model, [])
    with pytest.raises(ClipInterpretError, match="0 images"):
        decompose(tiny_model, torch.zeros(0, 3, 32, 32))
    d = decompose(tiny_model, pixels_for(tiny_model, n=1), layers=[2], spatial=True)
    text = tiny_model.encode_text(["x"])
    with pytest.raises(ClipInterpretError, match="outside the analysed layers"):
        d.token_similarity(text, heads=["L0.H0"])
    with pytest.raises(ClipInterpretError, match="does not exist"):
        d.token_similarity(text, heads=["L2.H9"])
    with pytest.raises(ClipInterpretError, match="bad head name"):
        d.token_similarity(text, heads=["layer2"])
    flat = decompose(tiny_model, pixels_for(tiny_model, n=1))
    with pytest.raises(ClipInterpretError, match="spatial=True"):
        flat.similarity_maps(text)


def test_convention_and_precision_are_checked_once_where_they_enter(monkeypatch):
    """load_model checks the precision once (not again in ClipModel.to nor in decompose), decompose
    checks its convention once (not once per batch)."""
    import importlib

    import clip_interpret.device as device_module

    decompose_module = importlib.import_module("clip_interpret.decompose")  # the package's name is the function

    calls = {"precision": 0, "convention": 0}

    def counted(kind, check):
        def wrapper(value):
            calls[kind] += 1
            return check(value)
        return wrapper

    monkeypatch.setattr(device_module, "check_precision", counted("precision", device_module.check_precision))
    monkeypatch.setattr(decompose_module, "check_convention", counted("convention", decompose_module.check_convention))
    model = load_model(make_open_clip("test-vit-tiny"), precision="bf16")
    assert calls == {"precision": 1, "convention": 0}
    x = pixels_for(model, n=6)
    d = decompose(model, x, batch_size=2, convention="published")  # three batches
    assert calls == {"precision": 1, "convention": 1}
    assert d.precision == "bf16" and d.convention == "published" and d.embedding.shape[0] == 6
    decompose(model, x, batch_size=2, precision="fp32")  # a precision given to the call enters there
    assert calls == {"precision": 2, "convention": 2}


def test_decompose_pixels_refuses_a_bad_precision_or_convention_clearly(tiny_model):
    from clip_interpret.decompose import decompose_pixels

    x = pixels_for(tiny_model, n=1)
    with pytest.raises(ClipInterpretError, match="unknown compute precision 'fp8'; choose one of fp32, bf16, fp16"):
        decompose_pixels(tiny_model.vit, x, precision="fp8")
    with pytest.raises(ClipInterpretError, match="unknown convention 'centered'"):
        decompose_pixels(tiny_model.vit, x, convention="centered")
