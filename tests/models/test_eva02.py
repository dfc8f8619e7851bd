"""EVA02-CLIP: timm Eva trunks with rotary embeddings, a SwiGLU MLP with its sub-LN, a LayerNorm over the
concatenated heads and (EVA02-E) post-norm blocks, converted and decomposed exactly: against the native
``encode_image`` at the real width, against the explicit forward for hooks and interventions, and a head's
share written out by hand from the frozen-scale algebra (docs/decomposition.md, EVA02)."""

import functools

import pytest
import torch

from clip_interpret import decompose, load_model
from clip_interpret.decompose import decompose_pixels
from clip_interpret.errors import ClipInterpretError, UnsupportedModelError
from clip_interpret.interventions import Targets, direct_effect, mean_activations, total_effect
from clip_interpret.models import open_clip_architectures
from clip_interpret.models.convert import from_open_clip
from clip_interpret.models.hooked_vit import HookedViT, ViTConfig
from clip_interpret.models.loader import registered_open_clip
from clip_interpret.models.openclip import tower_problem

from tests.helpers import explicit_forward, jitter, make_open_clip

TINY_TEXT = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)
EVA02 = ("EVA02-B-16", "EVA02-L-14", "EVA02-L-14-336", "EVA02-E-14", "EVA02-E-14-plus")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().detach())


def pixels_for(vit, n=2, seed=0):
    return torch.randn(n, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(seed))


def build(arch: str, monkeypatch, seed: int = 0, **trunk_kwargs):
    """A jittered random open_clip model of ``arch`` with a tiny text tower, its timm trunk built with
    ``trunk_kwargs`` (depth=1: one block of the real width)."""
    import timm

    open_clip = registered_open_clip()
    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", functools.partial(timm.create_model, **trunk_kwargs))
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None, text_cfg=TINY_TEXT)
    return jitter(model.eval(), seed=seed)


def check_exact(native, vit, n=2, spatial_layer=None):
    x = pixels_for(vit, n=n)
    with torch.no_grad():
        theirs = native.encode_image(x)
    assert rel_err(vit(x), theirs) < 1e-5
    unit = theirs / theirs.norm(dim=-1, keepdim=True)
    d = decompose_pixels(vit, x, layers="all")
    assert rel_err(d.total(), unit) < 1e-5 and rel_err(d.embedding, unit) < 1e-5
    if spatial_layer is not None:
        spatial = decompose_pixels(vit, x[:1], layers=[spatial_layer], spatial=True)
        assert spatial.head_tokens.shape[2] == vit.cfg.n_tokens
        assert rel_err(spatial.total(), unit[:1]) < 1e-5
        assert torch.allclose(spatial.head_tokens.sum(2), d.heads[:1, spatial_layer:spatial_layer + 1], atol=1e-6)
    return d


def test_eva02_is_listed():
    archs = open_clip_architectures()
    assert all(arch in archs for arch in EVA02)
    assert all(tower_problem(arch) is None for arch in EVA02)


def test_eva02_b16_at_its_real_width_matches_native_and_decomposes_exactly(monkeypatch):
    """EVA02-B-16's tower at its real width (768), heads (12), SwiGLU width (2048), patch (16) and image size
    (224) with two blocks, every parameter jittered: forward, total() and the spatial split within 1e-5."""
    native = build("EVA02-B-16", monkeypatch, depth=2)
    vit = from_open_clip(native.visual)
    cfg = vit.cfg
    assert (cfg.width, cfg.heads, cfg.mlp_width, cfg.patch_size, cfg.image_size, cfg.layers) == \
        (768, 12, 2048, (16, 16), (224, 224), 2)
    assert (cfg.rope, cfg.rope_prefix, cfg.glu, cfg.mlp_ln, cfg.attn_ln, cfg.post_norm, cfg.act) == \
        ("interleaved", 1, True, True, True, False, "silu")
    assert cfg.pool == "cls" and cfg.output_dim == 512 and cfg.proj_bias
    d = check_exact(native, vit, spatial_layer=1)
    assert d.heads.shape == (2, 2, 12, 512)


def test_eva02_l14_336_one_block_at_its_real_size(monkeypatch):
    """The 336 tower: a 24x24 grid, its rotary table made for a 16x16 reference grid (ref_feat_shape)."""
    native = build("EVA02-L-14-336", monkeypatch, depth=1)
    vit = from_open_clip(native.visual)
    assert (vit.cfg.width, vit.cfg.heads, vit.cfg.image_size, vit.rope_table.shape) == (1024, 16, (336, 336),
                                                                                       (576, 128))
    check_exact(native, vit, n=1)


def test_eva02_e14_post_norm_blocks_at_their_real_width(monkeypatch):
    """EVA02-E-14's layout (post-norm blocks, GELU MLP, no rotary) at its real width (1792), heads (16), MLP
    (15360), patch and image size, one block: the post-norm's scale frozen per token splits it exactly."""
    native = build("EVA02-E-14", monkeypatch, depth=1)
    vit = from_open_clip(native.visual)
    cfg = vit.cfg
    assert (cfg.width, cfg.heads, cfg.mlp_width, cfg.post_norm, cfg.rope, cfg.glu) == (1792, 16, 15360, True,
                                                                                       "none", False)
    assert vit.blocks[0].ln1 is None and vit.blocks[0].ln1_post is not None
    check_exact(native, vit, n=1, spatial_layer=0)


@pytest.mark.parametrize("kwargs", [
    dict(use_post_norm=True),
    dict(use_post_norm=True, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True),
    dict(swiglu_mlp=True),  # GluMlp: one packed fc1, gate first
    dict(scale_mlp=True),  # a sub-LN in a GELU MLP
    dict(init_values=0.1, scale_attn_inner=True),  # LayerScale after the inner norm
], ids=["post-norm", "post-norm-all-pieces", "packed-swiglu", "gelu-sub-ln", "layer-scale-inner-ln"])
def test_eva02_layout_options_convert_and_decompose_exactly(kwargs, monkeypatch):
    native = build("test-vit-tiny-eva", monkeypatch, seed=3, **kwargs)
    vit = from_open_clip(native.visual)
    d = check_exact(native, vit, n=3, spatial_layer=2)
    published = decompose_pixels(vit, pixels_for(vit, n=3), layers="all", convention="published")
    assert rel_err(published.total(), d.embedding) < 1e-5


@pytest.mark.parametrize("kwargs, named", [
    (dict(qk_norm=True), "qk-norm"),
    (dict(num_reg_tokens=1), "register tokens"),
    (dict(use_rot_pos_emb=True, rope_type="mixed"), "rotary position embeddings of kind RotaryEmbeddingMixed"),
    (dict(init_values=0.1, attn_only_layer_scale=True), "LayerScale on the attention branch only"),
])
def test_eva_pieces_still_not_expressed_are_refused_naming_them(kwargs, named, monkeypatch):
    native = build("test-vit-tiny-eva02", monkeypatch, **kwargs)
    with pytest.raises(UnsupportedModelError, match="timm Eva trunk with") as err:
        from_open_clip(native.visual)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_the_real_spec_loads_with_random_weights(monkeypatch):
    import open_clip as oc
    import timm

    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=1))
    monkeypatch.setattr(oc, "create_model", functools.partial(oc.create_model, text_cfg=TINY_TEXT))
    model = load_model("open_clip:EVA02-B-16")
    assert model.random_weights and model.vit.cfg.layers == 1 and model.vit.cfg.attn_ln
    torch.manual_seed(0)
    native = oc.create_model("EVA02-B-16", pretrained=None).eval()
    x = pixels_for(model.vit, n=1)
    with torch.no_grad():
        assert rel_err(model.vit(x), native.encode_image(x)) < 1e-5


def test_a_checkpoint_and_an_in_memory_model_load(tmp_path):
    from safetensors.torch import save_file

    native = make_open_clip("test-vit-tiny-eva02", seed=5)
    path = tmp_path / "eva02.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    x = pixels_for(from_open_clip(native.visual), n=2)
    with torch.no_grad():
        theirs = native.encode_image(x)
    for model in (load_model(f"open_clip:test-vit-tiny-eva02@{path}"), load_model(native)):
        with torch.no_grad():
            assert rel_err(model.vit(x), theirs) < 1e-5
        d = decompose(model, x, layers="all")
        assert rel_err(d.total(), theirs / theirs.norm(dim=-1, keepdim=True)) < 1e-5


@pytest.fixture(scope="module", params=["eva02", "post-norm"])
def tower(request):
    """The tiny EVA02-layout tower, and a post-norm one with every EVA02 piece (EVA02-E's blocks)."""
    native = make_open_clip("test-vit-tiny-eva02", seed=2)
    if request.param == "post-norm":
        import timm

        open_clip = registered_open_clip()
        original = timm.create_model
        timm.create_model = functools.partial(original, use_post_norm=True)
        try:
            torch.manual_seed(2)
            native = jitter(open_clip.create_model("test-vit-tiny-eva02", pretrained=None).eval(), seed=2)
        finally:
            timm.create_model = original
    return from_open_clip(native.visual)


def test_hook_points_agree_with_the_explicit_forward(tower):
    vit = tower
    x = pixels_for(vit, n=2)
    emb, cache = vit.run_with_cache(x)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(emb, ref_emb, atol=1e-5)
    for name, value in ref.items():
        assert torch.allclose(cache[name], value, atol=1e-5), name
    names = vit.hook_names()
    post = vit.cfg.post_norm
    assert ("blocks.0.ln1_post.hook_scale" in names) == post and ("blocks.0.ln1.hook_normalized" in names) != post
    assert "blocks.0.attn.ln.hook_scale" in names and "blocks.0.attn.hook_q_rot" in names


def test_freezing_the_inner_norm_scale_through_its_hook(tower):
    """The scale at ``attn.ln.hook_scale`` is the one the forward divides by: doubling it halves the heads'
    share of the layer's output before the projection (by hand: W_O (gamma C z / 2s + beta) + b_O)."""
    vit = tower
    x = pixels_for(vit, n=2, seed=3)
    _, cache = vit.run_with_cache(x)
    doubled = vit.run_with_hooks(x, [("blocks.2.attn.ln.hook_scale", lambda s, name: 2 * s)])
    block = vit.blocks[2]
    z = cache["blocks.2.attn.hook_z"].transpose(1, 2).reshape(2, -1, vit.cfg.width)[:, :1]
    s = cache["blocks.2.attn.ln.hook_scale"][:, :1, None]
    inner = (z - z.mean(-1, keepdim=True)) / (2 * s) * block.ln_inner.weight + block.ln_inner.bias
    out = inner @ block.out.weight.T + block.out.bias
    if block.ln1_post is not None:
        out = torch.nn.functional.layer_norm(out, (vit.cfg.width,), block.ln1_post.weight, block.ln1_post.bias,
                                             vit.cfg.ln_eps)
    r = cache["blocks.2.hook_resid_mid"][:, :1] - cache["blocks.2.hook_attn_out"][:, :1] + out
    h2 = r if block.ln2 is None else torch.nn.functional.layer_norm(r, (vit.cfg.width,), block.ln2.weight,
                                                                    block.ln2.bias, vit.cfg.ln_eps)
    r = r + block.mlp_output(h2, vit._act)
    expected = torch.nn.functional.layer_norm(r[:, 0], (vit.cfg.width,), vit.ln_post.weight, vit.ln_post.bias,
                                              vit.cfg.ln_eps) @ vit.proj + vit.proj_bias
    assert torch.allclose(doubled, expected, atol=1e-5)


def test_a_heads_share_by_hand_from_the_frozen_scales(tower):
    """Head h of layer 1 at the CLS row, written from the algebra: the inner norm's centring and gain over
    the head's own columns, / the inner scale; the projection; the post-norm's centring and gain / its scale;
    then LN_post's centring and gain / sigma, P, / ||emb||. The output bias: W_O beta_in + b_O through the
    post-norm (centred, gain, / its scale, + its bias)."""
    vit = tower
    cfg = vit.cfg
    x = pixels_for(vit, n=2, seed=4)
    emb, ref = explicit_forward(vit, x)
    d = decompose_pixels(vit, x, layers=[1])
    block = vit.blocks[1]
    r = ref["blocks.2.hook_resid_post"][:, 0]
    sigma = torch.sqrt(r.var(dim=-1, unbiased=False) + cfg.ln_eps)
    norm = emb.norm(dim=-1)

    def to_joint(c):  # c [B, width] -> [B, D]
        return ((c - c.mean(-1, keepdim=True)) * vit.ln_post.weight) @ vit.proj / (sigma * norm)[:, None]

    s_in = ref["blocks.1.attn.ln.hook_scale"][:, 0]
    for h in (0, 3):
        e = torch.zeros(2, cfg.width)
        e[:, h * cfg.head_dim:(h + 1) * cfg.head_dim] = ref["blocks.1.attn.hook_z"][:, h, 0]
        c = ((e - e.mean(-1, keepdim=True)) * block.ln_inner.weight / s_in[:, None]) @ block.out.weight.T
        if cfg.post_norm:
            c = (c - c.mean(-1, keepdim=True)) * block.ln1_post.weight / ref["blocks.1.ln1_post.hook_scale"][:, :1]
        assert torch.allclose(d.heads[:, 0, h], to_joint(c), atol=1e-6)
    bias = (block.out.weight @ block.ln_inner.bias + block.out.bias).expand(2, -1)
    if cfg.post_norm:
        bias = (bias - bias.mean(-1, keepdim=True)) * block.ln1_post.weight / \
            ref["blocks.1.ln1_post.hook_scale"][:, :1] + block.ln1_post.bias
    assert torch.allclose(d.attn_bias[:, 0], to_joint(bias), atol=1e-6)
    assert rel_err(d.total(), emb / norm[:, None]) < 1e-5


def test_reduced_precision_pieces_sum_to_that_passs_embedding(tower):
    vit = tower
    x = pixels_for(vit, n=2, seed=6)
    d = decompose_pixels(vit, x, layers="all", precision="bf16")
    assert rel_err(d.total(), d.embedding) < 1e-5
    _, ref = explicit_forward(vit, x)
    ref_unit = ref["hook_image_embed"] / ref["hook_image_embed"].norm(dim=-1, keepdim=True)
    assert rel_err(d.embedding, ref_unit) < 5e-2


def test_interventions_match_a_hand_made_forward(tower):
    vit = tower
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
    # direct effect of a head: its layer's output recomputed with the head's mean result (the norms inside
    # the output map recomputed too), the change added at the final stream only
    head = Targets.parse("L0.H2", vit.cfg)
    means = mean_activations(vit, [other], head)
    full, direct = direct_effect(vit, x, head, "mean", means)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(full, ref_emb / ref_emb.norm(dim=-1, keepdim=True), atol=1e-5)
    z = ref["blocks.0.attn.hook_z"].clone()
    z[:, 2] = ref_other["blocks.0.attn.hook_z"].mean(0)[2]
    changed = explicit_forward(vit, x, lambda name, value: z if name == "blocks.0.attn.hook_z" else value)[1]
    r = ref["blocks.2.hook_resid_post"][:, 0] - ref["blocks.0.hook_attn_out"][:, 0] + \
        changed["blocks.0.hook_attn_out"][:, 0]
    by_hand_direct = torch.nn.functional.layer_norm(r, (vit.cfg.width,), vit.ln_post.weight, vit.ln_post.bias,
                                                    vit.cfg.ln_eps) @ vit.proj + vit.proj_bias
    assert torch.allclose(direct, by_hand_direct / by_hand_direct.norm(dim=-1, keepdim=True), atol=1e-5)


def test_a_norm_inside_the_output_map_of_a_tower_not_cls_pooled_is_refused_by_the_decomposition():
    cfg = ViTConfig(image_size=(32, 32), patch_size=(8, 8), width=32, layers=2, heads=4, mlp_width=64,
                    output_dim=8, pool="avg", attn_ln=True)
    vit = jitter(HookedViT(cfg).eval())
    x = pixels_for(vit)
    with pytest.raises(ClipInterpretError, match="layer 0 of this 'avg'-pooled tower has a LayerNorm over its heads"):
        decompose_pixels(vit, x, layers="all")


def test_spectra_read_a_heads_directions_through_its_norms(tower):
    """head_svd's joint directions of a head (the output map with the norms' gains and centring, no pre-norm
    in a post-norm block) span that head's exact decomposition piece; editing a head's write through its
    output projection is refused there, in one line."""
    from clip_interpret.spectra import edit_head, head_svd

    vit = tower
    parts = decompose_pixels(vit, pixels_for(vit, n=4, seed=7), layers="all")
    for layer, head in [(0, 1), (2, 3)]:
        piece = parts.heads[:, layer, head].double()
        full = head_svd(vit, layer, head, k=vit.cfg.head_dim)["directions"].double()
        assert (piece @ full.T @ full - piece).abs().max() <= 1e-5 * max(1.0, piece.abs().max().item())
        fewer = head_svd(vit, layer, head, k=vit.cfg.head_dim - 2)["directions"].double()
        assert (piece @ fewer.T @ fewer - piece).abs().max() > 1e-4
    with pytest.raises(ClipInterpretError, match="layer 1 normalises its heads' output"):
        edit_head(vit, "L1.H0", torch.ones(vit.cfg.width), 0.0)
