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


@pytest.mark.parametrize("arch, depth", [("PE-Core-B-16", 2), ("PE-Core-bigG-14-448", 1)])
def test_pe_core_without_its_rotary_embedding_matches_native_at_real_width(arch, depth, monkeypatch):
    """Every PE-Core piece but the rotary embedding (switched off here, use_rot_pos_emb=False): AttentionRope's
    q/k/v rows, the LayerNorm before the blocks (no patch bias), the MAP head of 8 heads and MLP ratio 4 over
    the class and patch tokens (bigG: patch tokens only, no class token) and the trunk's head with its bias, at
    the real width, heads, MLP, patch and image size, every parameter jittered."""
    native = build(arch, monkeypatch, depth=depth, use_rot_pos_emb=False)
    vit = from_open_clip(native.visual)
    cfg = vit.cfg
    real = {"PE-Core-B-16": (768, 12, 3072, (16, 16), (224, 224), True, 1024),
            "PE-Core-bigG-14-448": (1536, 16, 8960, (14, 14), (448, 448), False, 1280)}[arch]
    assert (cfg.width, cfg.heads, cfg.mlp_width, cfg.patch_size, cfg.image_size, cfg.class_token,
            cfg.output_dim) == real
    assert (cfg.pool, cfg.pool_heads, cfg.pool_mlp_width, cfg.layers) == ("map", 8, 4 * cfg.width, depth)
    assert cfg.ln_pre and not cfg.patch_bias and cfg.proj_bias and cfg.ln_eps == 1e-5
    check_exact(native, vit, n=2)


def test_grouped_query_attention_is_refused_in_one_line(monkeypatch):
    native = build("test-vit-tiny-pe", monkeypatch, use_rot_pos_emb=False, qkv_fused=False, num_kv_heads=2)
    with pytest.raises(UnsupportedModelError, match="timm Eva trunk with") as err:
        from_open_clip(native.visual)
    assert "grouped-query attention (num_kv_heads)" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(qkv_fused=False), dict(class_token=False), dict(init_values=0.1)],
                         ids=["separate-qkv", "no-class-token", "layer-scale"])
def test_pe_layout_options_convert_exactly(kwargs, monkeypatch):
    """Separate q/k/v projections of AttentionRope (the key with its bias), no class token, LayerScale."""
    native = build("test-vit-tiny-pe", monkeypatch, seed=3, use_rot_pos_emb=False, **kwargs)
    vit = from_open_clip(native.visual)
    assert vit.cfg.class_token == ("class_token" not in kwargs) and vit.cfg.pool == "map"
    check_exact(native, vit, n=3, spatial_layer=1, seed=1)
