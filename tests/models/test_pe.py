"""Perception Encoder (PE-Core): open_clip towers on a timm Eva trunk with rotary attention (timm's
AttentionRope, an xy grid with offset 1), a LayerNorm before the blocks and a MAP attention-pooling head over
the class and patch tokens (PE-Core-bigG: no class token), the trunk's head (with its bias) as the projection;
converted and decomposed exactly."""

import functools

import pytest
import torch

from clip_interpret.decompose import decompose_pixels
from clip_interpret.errors import UnsupportedModelError
from clip_interpret.models.convert import from_open_clip
from clip_interpret.models.loader import registered_open_clip

TINY_TEXT = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().detach())


def pixels_for(vit, n=2, seed=0):
    return torch.randn(n, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(seed))


def build(arch: str, monkeypatch, seed: int = 0, **trunk_kwargs):
    """A jittered random open_clip model of ``arch`` with a tiny text tower, its timm trunk built with
    ``trunk_kwargs`` (depth=1: one block of the real width)."""
    import timm

    from tests.helpers import jitter

    open_clip = registered_open_clip()
    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", functools.partial(timm.create_model, **trunk_kwargs))
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, text_cfg=TINY_TEXT)
    return jitter(model.eval(), seed=seed)


def check_exact(native, vit, n=2, spatial_layer=None, seed=0):
    """Forward and total() within 1e-5 of native encode_image (fp32); the per-token pieces of one layer sum
    to its heads and the whole."""
    x = pixels_for(vit, n=n, seed=seed)
    with torch.no_grad():
        theirs = native.encode_image(x)
    assert rel_err(vit(x), theirs) < 1e-5
    unit = theirs / theirs.norm(dim=-1, keepdim=True)
    d = decompose_pixels(vit, x, layers="all")
    assert d.heads.shape == (n, vit.cfg.layers, vit.cfg.heads, theirs.shape[-1])
    assert rel_err(d.total(), unit) < 1e-5 and rel_err(d.embedding, unit) < 1e-5
    layer = vit.cfg.layers - 1 if spatial_layer is None else spatial_layer
    spatial = decompose_pixels(vit, x[:1], layers=[layer], spatial=True)
    assert spatial.head_tokens.shape == (1, 1, vit.cfg.n_tokens, vit.cfg.heads, theirs.shape[-1])
    assert rel_err(spatial.total(), unit[:1]) < 1e-5
    assert torch.allclose(spatial.head_tokens.sum(2), d.heads[:1, layer:layer + 1], atol=1e-6)
    return d


PE_CORE = ("PE-Core-T-16-384", "PE-Core-S-16-384", "PE-Core-B-16", "PE-Core-L-14-336", "PE-Core-bigG-14-448")


def test_every_pe_core_architecture_is_listed_as_map_pooled(tmp_path, monkeypatch, capsys):
    from clip_interpret.cli import main
    from clip_interpret.model_catalog import static_table
    from clip_interpret.models import open_clip_architectures
    from clip_interpret.models.openclip import tower_problem

    archs = open_clip_architectures()
    assert all(arch in archs and tower_problem(arch) is None for arch in PE_CORE)
    rows = {row[0]: row for row in static_table()[0]["open_clip"]}  # from the files, no torch
    assert all(rows[arch][1:3] == ["map", "CLIP BPE"] for arch in PE_CORE)
    monkeypatch.setenv("CLIP_INTERPRET_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(arch in out for arch in PE_CORE)


@pytest.mark.parametrize("arch, depth", [("PE-Core-B-16", 2), ("PE-Core-bigG-14-448", 1)])
def test_pe_core_matches_native_at_real_width_and_decomposes_exactly(arch, depth, monkeypatch):
    """PE-Core at its real width, heads, MLP, patch and image size, every parameter jittered: AttentionRope's
    q/k/v rows and its rotary embedding (xy grid, offset 1; bigG: no offset), the LayerNorm before the blocks (no
    patch bias), the MAP head of 8 heads and MLP ratio 4 over the class and patch tokens (bigG: patch tokens
    only, no class token) and the trunk's head with its bias: forward and total() within 1e-5 of encode_image,
    spatial too. bigG (width 1536, 1024 tokens) with one block, B-16 with two."""
    native = build(arch, monkeypatch, depth=depth)
    vit = from_open_clip(native.visual)
    cfg = vit.cfg
    real = {"PE-Core-B-16": (768, 12, 3072, (16, 16), (224, 224), True, 1024),
            "PE-Core-bigG-14-448": (1536, 16, 8960, (14, 14), (448, 448), False, 1280)}[arch]
    assert (cfg.width, cfg.heads, cfg.mlp_width, cfg.patch_size, cfg.image_size, cfg.class_token,
            cfg.output_dim) == real
    assert (cfg.pool, cfg.pool_heads, cfg.pool_mlp_width, cfg.layers) == ("map", 8, 4 * cfg.width, depth)
    assert cfg.ln_pre and not cfg.patch_bias and cfg.proj_bias and cfg.ln_eps == 1e-5
    assert (cfg.rope, cfg.rope_prefix) == ("interleaved", int(cfg.class_token))
    grid = cfg.grid[0] * cfg.grid[1]
    assert torch.equal(vit.rope_table, native.visual.trunk.rope.get_embed().float())
    assert vit.rope_table.shape == (grid, 2 * cfg.head_dim)
    check_exact(native, vit, n=2)


def test_the_rotary_embedding_is_what_makes_pe_core_exact(monkeypatch):
    """The same PE-Core-B-16 block without its rotary table (zeroed: no rotation) is no longer the native tower:
    the rotation is carried, not ignored."""
    native = build("PE-Core-B-16", monkeypatch, depth=1)
    vit = from_open_clip(native.visual)
    x = pixels_for(vit, n=1)
    with torch.no_grad():
        theirs = native.encode_image(x)
        assert rel_err(vit(x), theirs) < 1e-5
        sin, cos = vit.rope_table.chunk(2, dim=-1)
        vit.rope_table.copy_(torch.cat([torch.zeros_like(sin), torch.ones_like(cos)], dim=-1))
        assert rel_err(vit(x), theirs) > 1e-3


def test_grouped_query_attention_is_refused_in_one_line(monkeypatch):
    native = build("test-vit-tiny-pe", monkeypatch, qkv_fused=False, num_kv_heads=2)
    with pytest.raises(UnsupportedModelError, match="timm Eva trunk with") as err:
        from_open_clip(native.visual)
    assert "grouped-query attention (num_kv_heads)" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(), dict(qkv_fused=False), dict(class_token=False), dict(init_values=0.1),
                                    dict(use_rot_pos_emb=False)],
                         ids=["pe", "separate-qkv", "no-class-token", "layer-scale", "no-rotary"])
def test_pe_layout_options_convert_exactly(kwargs, monkeypatch):
    """The tiny PE-layout trunk, and with separate q/k/v projections of AttentionRope (the key with its bias),
    no class token (bigG's layout), LayerScale, or no rotary embedding."""
    native = build("test-vit-tiny-pe", monkeypatch, seed=3, **kwargs)
    vit = from_open_clip(native.visual)
    assert vit.cfg.class_token == ("class_token" not in kwargs) and vit.cfg.pool == "map"
    assert (vit.rope_table is None) == ("use_rot_pos_emb" in kwargs)
    check_exact(native, vit, n=3, spatial_layer=1, seed=1)


def test_the_real_spec_loads_with_random_weights(monkeypatch):
    """``open_clip:PE-Core-B-16`` (random weights, seed 0) as the loader builds it, with two blocks and a tiny
    text tower: the same tower as open_clip's own build from that seed."""
    import open_clip as oc
    import timm

    from clip_interpret import load_model

    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=2))
    monkeypatch.setattr(oc, "create_model", functools.partial(oc.create_model, text_cfg=TINY_TEXT))
    model = load_model("open_clip:PE-Core-B-16")
    assert model.random_weights and model.vit.cfg.layers == 2 and model.vit.cfg.pool == "map"
    torch.manual_seed(0)
    native = oc.create_model("PE-Core-B-16", pretrained=None).eval()
    x = pixels_for(model.vit, n=1)
    with torch.no_grad():
        assert rel_err(model.vit(x), native.encode_image(x)) < 1e-5


def test_a_pe_checkpoint_and_an_in_memory_model_load(tmp_path):
    from safetensors.torch import save_file

    from clip_interpret import decompose, load_model

    from tests.helpers import make_open_clip

    native = make_open_clip("test-vit-tiny-pe", seed=5)
    path = tmp_path / "pe.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    x = pixels_for(from_open_clip(native.visual), n=2)
    with torch.no_grad():
        theirs = native.encode_image(x)
    for model in (load_model(f"open_clip:test-vit-tiny-pe@{path}"), load_model(native)):
        assert not model.random_weights
        with torch.no_grad():
            assert rel_err(model.vit(x), theirs) < 1e-5
        d = decompose(model, x, layers="all")
        assert rel_err(d.total(), theirs / theirs.norm(dim=-1, keepdim=True)) < 1e-5
        assert model.encode_text(["a red circle"]).shape == (1, 24)


@pytest.fixture(scope="module", params=[{}, dict(class_token=False)], ids=["class-token", "no-class-token"])
def pe_vit(request):
    """The tiny PE-layout tower (jittered), with its class token or without (bigG's layout)."""
    import timm

    from tests.helpers import jitter

    open_clip = registered_open_clip()
    original = timm.create_model
    try:
        timm.create_model = functools.partial(original, **request.param)
        torch.manual_seed(2)
        model = open_clip.create_model("test-vit-tiny-pe", pretrained=None, text_cfg=TINY_TEXT)
    finally:
        timm.create_model = original
    vit = from_open_clip(jitter(model.eval(), seed=2).visual)
    assert vit.cfg.class_token == (not request.param)
    return vit


def test_hook_points_agree_with_the_explicit_forward(pe_vit):
    """Every activation the explicit forward writes out (rotated q and k, patterns, heads, MLPs, LN_post of every
    token, the pooling head) is the hooked loop's."""
    from tests.helpers import explicit_forward

    vit = pe_vit
    x = pixels_for(vit, n=2)
    emb, cache = vit.run_with_cache(x)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(emb, ref_emb, atol=1e-5)
    assert "blocks.0.attn.hook_q_rot" in ref and "pool.hook_pattern" in ref
    for name, value in ref.items():
        assert torch.allclose(cache[name], value, atol=1e-5), name
    assert cache["blocks.2.hook_resid_post"].shape == (2, vit.cfg.n_tokens, 32)  # the pooling head reads every row


def test_interventions_on_a_pe_tower_match_a_hand_made_forward(pe_vit):
    """Total effects of mean-ablated heads, and the direct effect of an early MLP (its mean replaces it at the
    pooling head only), against the explicit forward with the same replacements made by hand."""
    from clip_interpret.interventions import Targets, direct_effect, hooks, mean_activations, total_effect

    from tests.helpers import explicit_forward

    vit = pe_vit
    x, other = pixels_for(vit, n=3, seed=1), pixels_for(vit, n=3, seed=2)
    targets = Targets.parse("L0.H1,L1.H3", vit.cfg)
    values = mean_activations(vit, [other], targets)
    _, ref_other = explicit_forward(vit, other)

    def by_hand(name, z):
        heads = [h for l, h in targets.heads if name == f"blocks.{l}.attn.hook_z"]
        if not heads:
            return z
        z = z.clone()
        z[:, heads] = ref_other[name].mean(0)[heads]
        return z

    expected = explicit_forward(vit, x, by_hand)[0]
    assert torch.allclose(total_effect(vit, x, targets, "mean", values), expected / expected.norm(dim=-1, keepdim=True),
                          atol=1e-5)
    # direct effect of MLP0: the final stream with MLP0's output swapped for its mean, every later block unchanged
    mlp0 = Targets.parse("MLP0", vit.cfg)
    means = mean_activations(vit, [other], mlp0)
    full, direct = direct_effect(vit, x, mlp0, "mean", means)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(full, ref_emb / ref_emb.norm(dim=-1, keepdim=True), atol=1e-5)
    mean_mlp0 = ref_other["blocks.0.hook_mlp_out"].mean(0)
    final = ref["blocks.2.hook_resid_post"] - ref["blocks.0.hook_mlp_out"] + mean_mlp0
    normed = torch.nn.functional.layer_norm(final, (vit.cfg.width,), vit.ln_post.weight, vit.ln_post.bias,
                                            vit.cfg.ln_eps)
    by_hand_direct = explicit_forward(vit, x, lambda name, v: normed if name == "ln_post.hook_normalized" else v)[0]
    assert torch.allclose(direct, by_hand_direct / by_hand_direct.norm(dim=-1, keepdim=True), atol=1e-5)
    assert not torch.allclose(direct, full, atol=1e-4)
    # the decomposition of an intervened forward is exact too
    d = decompose_pixels(vit, x, layers=[1, 2], fwd_hooks=hooks(targets, "zero"))
    assert torch.allclose(d.embedding, total_effect(vit, x, targets, "zero"), atol=1e-6)
    assert (d.total() - d.embedding).abs().max() < 1e-5


def test_the_projection_bias_joins_the_constant_and_the_pooling_heads_own_view(pe_vit):
    """PE-Core's projection is the trunk's Linear with a bias b_P, after the MAP head: the constant is
    (P^T (W_O (W_V beta + b_V) + b_O) + b_P) / ||emb|| (from its definition), and the pooling head's own
    partition (pool_view: its heads per source token, its output bias with b_P, its MLP) sums to the embedding
    too."""
    vit = pe_vit
    pool, w = vit.pool, vit.cfg.width
    assert vit.proj_bias.abs().max() > 1e-3  # jittered: a dropped bias would show
    x = pixels_for(vit, n=2, seed=4)
    for spatial in (False, True):
        d = decompose_pixels(vit, x, layers="all", spatial=spatial)
        norm = vit(x).norm(dim=-1, keepdim=True).detach().to(d.embedding.dtype)
        beta_through = (vit.ln_post.bias @ pool.kv.weight[w:].T + pool.kv.bias[w:]) @ pool.out.weight.T + pool.out.bias
        assert torch.allclose(d.constant, (beta_through @ vit.proj + vit.proj_bias) / norm, atol=1e-6)
        view = d.pool_view()
        assert torch.allclose(view["pool_bias"][:, 0], (pool.out.bias @ vit.proj + vit.proj_bias) / norm, atol=1e-6)
        assert rel_err(sum(piece.sum(dim=1) for piece in view.values()), d.embedding) < 1e-5
        assert rel_err(d.total(), d.embedding) < 1e-5
