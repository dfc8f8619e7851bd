"""Rotary position embeddings (models/rotary.py): the rotation against timm's and a complex-number one
written here, and a rotary Eva tower converted and decomposed exactly, its rotated q/k at their hook points."""

import functools

import pytest
import torch

from clip_interpret.decompose import decompose_pixels
from clip_interpret.models.convert import from_open_clip
from clip_interpret.models.hooked_vit import HookedViT, ViTConfig
from clip_interpret.models.loader import registered_open_clip
from clip_interpret.models.rotary import apply_rotary

from tests.helpers import explicit_forward, jitter, rope_by_hand

TINY_TEXT = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)


def rel_err(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max().detach())


def build(monkeypatch, seed=0, **trunk_kwargs):
    import timm

    open_clip = registered_open_clip()
    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", functools.partial(timm.create_model, **trunk_kwargs))
        torch.manual_seed(seed)
        model = open_clip.create_model("test-vit-tiny-eva", pretrained=None, text_cfg=TINY_TEXT)
    return jitter(model.eval(), seed=seed)


@pytest.mark.parametrize("mode", ["interleaved", "half"])
@pytest.mark.parametrize("prefix", [0, 1])
def test_the_rotation_matches_timm_and_complex_multiplication(mode, prefix):
    from timm.layers import apply_rot_embed_cat

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5 + prefix, 8, generator=gen)
    table = torch.randn(5, 16, generator=gen)
    ours = apply_rotary(x, table, mode, prefix)
    theirs = apply_rot_embed_cat(x[:, :, prefix:], table, half=mode == "half")
    assert torch.allclose(ours[:, :, prefix:], theirs, atol=1e-6)
    assert torch.equal(ours[:, :, :prefix], x[:, :, :prefix])
    # a real table (sin^2 + cos^2 = 1) rotates: norms are kept, and the complex product agrees
    angles = torch.rand(5, 8, generator=gen) * 6.28
    real = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if mode == "interleaved":
        real = real.view(5, 2, 4, 2)[..., :1].expand(5, 2, 4, 2).reshape(5, 16)  # one angle per pair
    else:
        real = real.view(5, 2, 2, 4)[:, :, :1].expand(5, 2, 2, 4).reshape(5, 16)
    turned = apply_rotary(x, real, mode, prefix)
    assert torch.allclose(turned, rope_by_hand(x, real, mode, prefix), atol=1e-6)
    assert torch.allclose(turned.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_only_the_positions_held_are_rotated():
    """The last block of a CLS-pooled tower computes its CLS query alone: nothing after the prefix to rotate."""
    x = torch.randn(1, 2, 1, 8)
    table = torch.randn(4, 16)
    assert torch.equal(apply_rotary(x, table, "interleaved", 1), x)
    full = torch.randn(1, 2, 4, 8)
    assert torch.allclose(apply_rotary(full[:, :, :3], table, "half", 0), apply_rotary(full, table, "half", 0)[:, :, :3])


def test_a_rope_prefix_that_does_not_leave_the_grid_is_refused():
    cfg = dict(image_size=(32, 32), patch_size=(8, 8), width=32, layers=1, heads=4, mlp_width=64, output_dim=8)
    with pytest.raises(ValueError, match="rope_prefix=0 leaves 17 tokens to rotate; the grid has 16"):
        HookedViT(ViTConfig(**cfg, rope="interleaved", rope_prefix=0))
    with pytest.raises(ValueError, match="unknown rotary mode 'cat'"):
        HookedViT(ViTConfig(**cfg, rope="cat", rope_prefix=1))
    plain = HookedViT(ViTConfig(**cfg))
    assert plain.rope_table is None and not any("rot" in n for n in plain.hook_names())


@pytest.mark.parametrize("kwargs", [
    dict(use_rot_pos_emb=True, ref_feat_shape=(2, 2)),
    dict(use_rot_pos_emb=True, rope_grid_indexing="xy", rope_grid_offset=1.0, rope_rotate_half=True),
    dict(use_rot_pos_emb=True, qkv_fused=False, rope_temperature=100.0),
], ids=["eva02-ij", "pe-like-xy-offset-half", "separate-qkv"])
def test_a_rotary_eva_tower_matches_native_and_decomposes_exactly(kwargs, monkeypatch):
    native = build(monkeypatch, seed=4, **kwargs)
    vit = from_open_clip(native.visual)
    assert vit.cfg.rope == ("half" if kwargs.get("rope_rotate_half") else "interleaved") and vit.cfg.rope_prefix == 1
    assert vit.rope_table.shape == (16, 16) and vit.rope_table.abs().sum() > 0
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = native.encode_image(x)
    assert rel_err(vit(x), theirs) < 1e-5
    unit = theirs / theirs.norm(dim=-1, keepdim=True)
    d = decompose_pixels(vit, x, layers="all", spatial=True)
    assert rel_err(d.total(), unit) < 1e-5
    assert torch.allclose(d.head_tokens.sum(2), d.heads, atol=1e-6)
    # without the rotation the tower computes something else: the table matters
    with torch.no_grad():
        vit.rope_table[:, :8].zero_()
        vit.rope_table[:, 8:].fill_(1.0)
    assert rel_err(vit(x), theirs) > 1e-3


def test_rotated_queries_and_keys_at_their_hook_points(monkeypatch):
    native = build(monkeypatch, seed=5, use_rot_pos_emb=True)
    vit = from_open_clip(native.visual)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    names = vit.hook_names()
    assert names.index("blocks.0.attn.hook_v") < names.index("blocks.0.attn.hook_q_rot") \
        < names.index("blocks.0.attn.hook_k_rot") < names.index("blocks.0.attn.hook_pattern")
    emb, cache = vit.run_with_cache(x)
    ref_emb, ref = explicit_forward(vit, x)
    assert torch.allclose(emb, ref_emb, atol=1e-5)
    for name in ("blocks.1.attn.hook_q_rot", "blocks.1.attn.hook_k_rot", "blocks.1.attn.hook_pattern",
                 "blocks.2.attn.hook_z"):
        assert torch.allclose(cache[name], ref[name], atol=1e-5), name
    assert torch.equal(cache["blocks.1.attn.hook_q_rot"][:, :, 0], cache["blocks.1.attn.hook_q"][:, :, 0])
    assert not torch.allclose(cache["blocks.1.attn.hook_k_rot"][:, :, 1:], cache["blocks.1.attn.hook_k"][:, :, 1:])
    # hooks on the rotated q and k change the pattern: handing back the unrotated q and k of the same pass
    # gives the tower without rotary embeddings
    held = {}

    def hold(value, name):
        held[name] = value

    def unrotated_of(value, name):
        return held[name.replace("_rot", "")]

    undo = [(f"blocks.{layer}.attn.hook_{t}", hold) for layer in range(3) for t in "qk"] + \
        [(f"blocks.{layer}.attn.hook_{t}_rot", unrotated_of) for layer in range(3) for t in "qk"]
    unrotated = vit.run_with_hooks(x, undo)
    assert rel_err(unrotated, emb) > 1e-3
    saved = vit.rope_table.clone()
    with torch.no_grad():
        vit.rope_table[:, :8].zero_()
        vit.rope_table[:, 8:].fill_(1.0)  # sin 0, cos 1: no rotation
    try:
        assert torch.allclose(unrotated, explicit_forward(vit, x)[0], atol=1e-5)
    finally:
        with torch.no_grad():
            vit.rope_table.copy_(saved)
