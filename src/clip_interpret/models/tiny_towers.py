"""Tiny timm trunks for the test configs (``test-vit-tiny-map``, ``test-vit-tiny-eva``, ``test-vit-tiny-pe``),
registered with timm.

timm's own SigLIP trunks (``vit_*_siglip_*``) are too large for a test suite, and open_clip
passes no size arguments to timm; so, as the tiny ``test-*`` open_clip configs do, a tiny
trunk of the same kind is registered under its own name: a ViT without a class token, pooled
by a MAP attention head, tanh-GELU and LayerNorm eps 1e-6 (as SigLIP); and a timm ``Eva`` trunk with
EVA01-CLIP's layout (plain pre-norm blocks, fused q/k/v with q and v biases, CLS pooling, GELU); one with
EVA02-CLIP's (rotary embeddings, separate q/k/v, a LayerNorm over the heads, a SwiGLU MLP with its sub-LN); and one
with Perception Encoder's (PE-Core: rotary attention on an xy grid with offset 1, a LayerNorm before the blocks, a
MAP attention-pooling head over the class and patch tokens, the trunk's head as the projection).
"""

from functools import partial

from torch.nn import LayerNorm

from timm.models import register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

EVA_TRUNKS = ("clip_interpret_test_eva_tiny", "clip_interpret_test_eva02_tiny",
              "clip_interpret_test_pe_tiny")  # timm Eva trunks registered here (judged as eva.py's are)


@register_model
def clip_interpret_test_map_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """3 layers x 4 heads, width 32, 32x32 images in 8x8 patches, MAP pooling with 4 heads."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's creation arguments
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, class_token=False,
                global_pool="map", act_layer="gelu_tanh")
    return VisionTransformer(**dict(args, **kwargs))


@register_model
def clip_interpret_test_eva_tiny(pretrained: bool = False, **kwargs) -> Eva:
    """EVA01's layout in small: 3 layers x 4 heads, width 32, MLP 96, 32x32 images in 8x8 patches, CLS pooling."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=3.0, global_pool="token")
    return Eva(**dict(args, **kwargs))


@register_model
def clip_interpret_test_pe_tiny(pretrained: bool = False, **kwargs) -> Eva:
    """PE-Core's layout in small (timm's ``vit_pe_core_*`` arguments): 3 layers x 4 heads, width 32, MLP 128,
    32x32 images in 8x8 patches, rotary attention (xy grid, offset 1), a LayerNorm before the blocks and MAP
    pooling with 4 heads (``class_token=False`` gives PE-Core-bigG's layout)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=4.0, global_pool="map",
                attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=4, attn_pool_mlp_ratio=4.0,
                norm_layer=partial(LayerNorm, eps=1e-5))
    return Eva(**dict(args, **kwargs))


@register_model
def clip_interpret_test_eva02_tiny(pretrained: bool = False, **kwargs) -> Eva:
    """EVA02-CLIP's layout in small (as ``eva02_base_patch16_clip_224``): 3 layers x 4 heads, width 32, 32x32
    images in 8x8 patches, rotary embeddings, separate q/k/v, scale_attn_inner, SwiGLU (ratio 4*2/3) with its
    sub-LN (scale_mlp), CLS pooling."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=4 * 2 / 3, qkv_fused=False,
                swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                global_pool="token")
    return Eva(**dict(args, **kwargs))
