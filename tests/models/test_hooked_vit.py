"""HookedViT equals the native open_clip / Hugging Face image towers (fp32, 1e-5 relative)."""

import pytest
import torch

from clip_interpret import load_model
from clip_interpret.errors import ModelLoadError, UnsupportedModelError
from clip_interpret.models.convert import from_open_clip

from tests.helpers import jitter, make_hf_clip, make_open_clip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def native_vs_ours(native, pixels):
    ours = load_model(native)
    with torch.no_grad():
        return ours.vit(pixels), native.encode_image(pixels)


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-16-plus-240", "ViT-B-32-quickgelu",
                                  "test-vit-tiny", "test-vit-tiny-ls"])
def test_open_clip_image_embedding_matches_native(arch):
    native = make_open_clip(arch)
    size = native.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    ours, theirs = native_vs_ours(native, pixels)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 1e-5


def test_converted_config_reads_the_native_settings():
    vit = load_model(make_open_clip("test-vit-tiny-ls")).vit
    cfg = vit.cfg
    assert cfg.layer_scale and not cfg.ln_pre and cfg.act == "gelu"
    assert cfg.image_size == (48, 32) and cfg.grid == (3, 2) and cfg.n_tokens == 7
    assert load_model(make_open_clip("ViT-B-32-quickgelu")).vit.cfg.act == "quick_gelu"


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_image_embedding_matches_native(act):
    native = make_hf_clip(act=act)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ours = load_model(native)
    with torch.no_grad():
        theirs = native.get_image_features(pixel_values=pixels)
        theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
        mine = ours.vit(pixels)
    assert rel_err(mine, theirs) < 1e-5


def test_run_with_cache_names_and_agrees_with_forward(tiny_model):
    vit = tiny_model.vit
    pixels = torch.randn(2, 3, 32, 32)
    emb, cache = vit.run_with_cache(pixels)
    with torch.no_grad():
        assert torch.allclose(emb, vit(pixels), atol=1e-5, rtol=1e-4)
    for layer in range(vit.cfg.layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == (2, vit.cfg.heads, 17, 17)
        assert torch.allclose(pattern.sum(-1), torch.ones(2, vit.cfg.heads, 17), atol=1e-5)
        assert f"blocks.{layer}.hook_mlp_out" in cache and f"blocks.{layer}.attn.hook_z" in cache
    assert cache["ln_post.hook_scale"].shape == (2,)


def test_wrong_pixel_shape_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        tiny_model.vit(torch.randn(1, 3, 64, 64))


def _tiny_clip(**vision):
    from open_clip.model import CLIP

    vision_cfg = dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8, **vision)
    text_cfg = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)
    return jitter(CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg).eval())


@pytest.mark.parametrize("vision, words", [
    (dict(attentional_pool="parallel", attn_pooler_queries=4, attn_pooler_heads=2), "attentional_pool='parallel'"),
    (dict(qk_norm=True), "blocks"),
    (dict(pool_type="avg"), "pool_type"),
])
def test_unsupported_open_clip_towers_are_refused_with_what_is_supported(vision, words):
    model = _tiny_clip(**vision)
    with pytest.raises(UnsupportedModelError, match=words) as err:
        from_open_clip(model.visual)
    assert "Supported:" in str(err.value)


def test_resnet_tower_is_refused():
    with pytest.raises(ModelLoadError, match="ResNet"):
        load_model("open_clip:RN50")
    from open_clip.model import CLIP

    resnet = CLIP(embed_dim=16, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=32),
                  text_cfg=dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1))
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        load_model(resnet)


BIG_TOWERS = ["ViT-H-14", "ViT-H-14-quickgelu", "ViT-H-14-378-quickgelu", "ViT-bigG-14", "ViT-bigG-14-quickgelu"]


@pytest.mark.parametrize("arch", BIG_TOWERS)
def test_big_plain_towers_match_native_with_fewer_layers(arch):
    """The big towers of DFN, MetaCLIP and LAION at their real width, heads, head width, MLP ratio, patch
    and image size, built with 2 of their layers (open_clip config overrides; the layers are all alike)
    and a tiny text tower: ViT-bigG-14 in full is 1.8 B image parameters."""
    from clip_interpret.decompose import decompose_pixels
    from clip_interpret.models.loader import registered_open_clip

    vision = dict(registered_open_clip().get_model_config(arch)["vision_cfg"], layers=2)
    native = make_open_clip(arch, vision_cfg=vision, text_cfg=dict(context_length=8, vocab_size=100, width=16,
                                                                   heads=2, layers=1))
    vit = from_open_clip(native.visual)
    width = {"H": 1280, "b": 1664}[arch.split("-")[1][0]]
    assert (vit.cfg.width, vit.cfg.head_dim) == (width, 80 if width == 1280 else 104)
    assert vit.cfg.act == ("quick_gelu" if arch.endswith("quickgelu") else "gelu")
    x = torch.randn(1, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(vit(x), native.encode_image(x)) < 1e-5
    d = decompose_pixels(vit, x, layers="all")
    assert (d.total() - d.embedding).abs().max() < 1e-5


def test_eva_towers_are_refused_with_what_is_supported():
    from open_clip.timm_model import TimmModel

    with torch.device("meta"):  # its structure only
        tower = TimmModel("vit_base_patch16_rope_mixed_224", embed_dim=512, pool="token", proj=None)
    with pytest.raises(UnsupportedModelError, match="Eva trunk.*RotaryEmbeddingMixed.*Supported:"):
        from_open_clip(tower)


@torch.no_grad()
def test_each_block_owns_its_attention_output_map(tiny_ls_model):
    """out_weight()/out_bias() (the projection with its LayerScale) are the map the forward applies."""
    vit = tiny_ls_model.vit
    x = torch.randn(2, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(3))
    _, cache = vit.run_with_cache(x, names_filter=lambda n: n.endswith(("attn.hook_z", "hook_attn_out")))
    for layer, block in enumerate(vit.blocks[:-1]):
        z, out = cache["z", layer], cache["attn_out", layer]
        merged = z.transpose(1, 2).flatten(2)  # [B, T, H * d], heads in order
        assert block.ls1 is not None and float((block.ls1.detach() - 1).abs().max()) > 1e-3  # a real LayerScale
        assert torch.allclose(merged @ block.out_weight().T + block.out_bias(), out, atol=1e-6)
        assert torch.equal(block.attn_output(merged), out)  # the forward's own arithmetic
        change = torch.zeros_like(merged)
        assert torch.equal(block.attn_output(change, bias=False), torch.zeros_like(out))


def test_the_cls_query_row_is_a_hook_point(tiny_model, map_model):
    vit = tiny_model.vit
    x = torch.randn(2, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(4))
    row, full = "blocks.1.attn.hook_cls_pattern", "blocks.1.attn.hook_pattern"
    emb, both = vit.run_with_cache(x, names_filter=[row, full, "blocks.1.attn.hook_z"])
    assert both[row].shape == (2, vit.cfg.heads, 1, vit.cfg.n_tokens)
    assert torch.equal(both[row], both[full][:, :, :1])
    alone_emb, alone = vit.run_with_cache(x, names_filter=[row, "blocks.1.attn.hook_v", "blocks.1.attn.hook_z"])
    assert torch.allclose(alone[row], both[row], atol=1e-6)
    assert torch.allclose(alone_emb, emb, atol=1e-6) and torch.allclose(vit(x), emb, atol=1e-6)

    def uniform(pattern, name):
        return torch.full_like(pattern, 1 / pattern.shape[-1])

    for asked in ([row], [row, full]):  # the CLS row alone, or within the full pattern
        _, hooked = vit.run_with_cache(x, names_filter=["blocks.1.attn.hook_z", "blocks.1.attn.hook_v", *asked],
                                       fwd_hooks=[(row, uniform)])
        z, v = hooked["z", 1], hooked["v", 1]
        assert torch.allclose(z[:, :, 0], v.mean(dim=2), atol=1e-6)  # only the CLS query's row replaced
        assert torch.allclose(z[:, :, 1:], alone["z", 1][:, :, 1:], atol=1e-6)
    assert not any("cls_pattern" in name for name in map_model.vit.hook_names())  # no CLS token, no CLS row


def test_readers_added_to_hook_points_keep_the_last_block_cut_short(tiny_model):
    from clip_interpret.errors import ClipInterpretError
    from clip_interpret.models.hooked_vit import HookPoints

    vit = tiny_model.vit
    x = torch.randn(2, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(5))
    name = f"blocks.{vit.cfg.layers - 1}.attn.hook_z"
    seen = {}
    reader = HookPoints(vit)
    reader.add(name, lambda z, n: seen.update(reader=z.shape))
    assert torch.allclose(vit.run(x, reader), vit(x), atol=1e-6)
    full = HookPoints(vit, fwd_hooks=[(name, lambda z, n: seen.update(hook=z.shape))])
    assert torch.allclose(vit.run(x, full), vit(x), atol=1e-6)
    heads, d = vit.cfg.heads, vit.cfg.head_dim
    assert seen == {"reader": (2, heads, 1, d), "hook": (2, heads, vit.cfg.n_tokens, d)}
    order = []
    points = HookPoints(vit, fwd_hooks=[(name, lambda z, n: order.append("user"))])
    points.add(name, lambda z, n: order.append("after"))
    points.add(name, lambda z, n: order.append("before"), first=True)
    vit.run(x, points)
    assert order == ["before", "user", "after"]
    with pytest.raises(ClipInterpretError, match="unknown hook point 'blocks.9.attn.hook_z'"):
        HookPoints(vit).add("blocks.9.attn.hook_z", lambda z, n: None)


def test_the_loop_takes_no_decomposition_options(tiny_model):
    """HookedViT.run computes the embedding; what the decomposition needs it reads through hook points."""
    import inspect

    from clip_interpret.models.hooked_vit import HookedViT

    assert list(inspect.signature(HookedViT.run).parameters) == ["self", "pixels", "points"]
    x = torch.randn(1, 3, *tiny_model.vit.cfg.image_size)
    assert torch.equal(tiny_model.vit.run(x), tiny_model.vit(x))
