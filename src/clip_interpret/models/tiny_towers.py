"""A tiny timm trunk for the test configs (``test-vit-tiny-map``), registered with timm.

timm's own SigLIP trunks (``vit_*_siglip_*``) are too large for a test suite, and open_clip
passes no size arguments to timm; so, as the tiny ``test-*`` open_clip configs do, a tiny
trunk of the same kind is registered under its own name: a ViT without a class token, pooled
by a MAP attention head, tanh-GELU and LayerNorm eps 1e-6 (as SigLIP).
"""

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


@register_model
def clip_interpret_test_map_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """3 layers x 4 heads, width 32, 32x32 images in 8x8 patches, MAP pooling with 4 heads."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's creation arguments
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, class_token=False,
                global_pool="map", act_layer="gelu_tanh")
    return VisionTransformer(**dict(args, **kwargs))
