"""Convert open_clip and Hugging Face CLIP image towers into a HookedViT.

Each converter reads the native module's configuration, refuses what the
decomposition cannot express (with a message naming what is supported), and
copies the weights. Equality with the native forward is checked in the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .hooked_vit import HookedViT, ViTConfig

SUPPORTED = (
    "ViT image towers with a CLS token and CLS pooling: open_clip VisionTransformer "
    "(quick_gelu or gelu, with or without LayerScale, any patch and image size) and "
    "Hugging Face CLIP vision towers"
)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported image tower: {what}. Supported: {SUPPORTED}.")


def _activation_name(module: nn.Module) -> str:
    kind = type(module).__name__
    if kind == "QuickGELU":
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    raise _unsupported(f"MLP activation {kind}")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.detach().to(dst.dtype).reshape(dst.shape))


def from_open_clip(visual: nn.Module) -> HookedViT:
    """HookedViT from an open_clip ``VisionTransformer`` (``model.visual``)."""
    kind = type(visual).__name__
    if kind != "VisionTransformer":
        raise _unsupported(f"open_clip {kind} (ResNet and timm towers have no attention heads to decompose here)")
    if getattr(visual, "attn_pool", None) is not None:
        raise _unsupported("attention pooling (attn_pool)")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise _unsupported(f"pool_type={visual.pool_type!r} (only CLS-token pooling)")
    blocks = visual.transformer.resblocks
    first = blocks[0]
    if type(first).__name__ != "ResidualAttentionBlock" or not isinstance(first.attn, nn.MultiheadAttention):
        raise _unsupported(f"{type(first).__name__} blocks (qk-norm, scaled-cosine or scaled attention)")
    if hasattr(first, "ln_1_kv"):
        raise _unsupported("cross-attention blocks")
    layer_scale = type(first.ls_1).__name__ == "LayerScale"
    ln_pre = isinstance(visual.ln_pre, nn.LayerNorm)
    width = visual.conv1.out_channels
    proj = visual.proj
    if proj is None:
        raise _unsupported("no projection (proj=None)")
    cfg = ViTConfig(
        image_size=_pair(visual.image_size),
        patch_size=_pair(visual.patch_size),
        width=width,
        layers=len(blocks),
        heads=first.attn.num_heads,
        mlp_width=first.mlp.c_fc.out_features,
        output_dim=proj.shape[1],
        act=_activation_name(first.mlp.gelu),
        ln_pre=ln_pre,
        layer_scale=layer_scale,
        ln_eps=float(first.ln_1.eps),
        patch_bias=visual.conv1.bias is not None,
    )
    vit = HookedViT(cfg)
    _copy(vit.patch_embed.weight, visual.conv1.weight)
    if cfg.patch_bias:
        _copy(vit.patch_embed.bias, visual.conv1.bias)
    _copy(vit.cls_embedding, visual.class_embedding)
    _copy(vit.pos_embedding, visual.positional_embedding)
    if ln_pre:
        _copy_ln(vit.ln_pre, visual.ln_pre)
    for ours, theirs in zip(vit.blocks, blocks):
        _copy_ln(ours.ln1, theirs.ln_1)
        _copy(ours.qkv.weight, theirs.attn.in_proj_weight)
        _copy(ours.qkv.bias, theirs.attn.in_proj_bias)
        _copy(ours.out.weight, theirs.attn.out_proj.weight)
        _copy(ours.out.bias, theirs.attn.out_proj.bias)
        _copy_ln(ours.ln2, theirs.ln_2)
        _copy(ours.fc1.weight, theirs.mlp.c_fc.weight)
        _copy(ours.fc1.bias, theirs.mlp.c_fc.bias)
        _copy(ours.fc2.weight, theirs.mlp.c_proj.weight)
        _copy(ours.fc2.bias, theirs.mlp.c_proj.bias)
        if layer_scale:
            _copy(ours.ls1, theirs.ls_1.gamma)
            _copy(ours.ls2, theirs.ls_2.gamma)
    _copy_ln(vit.ln_post, visual.ln_post)
    _copy(vit.proj, proj)
    return vit.eval()


def _copy_ln(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    if src.weight is None or src.bias is None:
        raise _unsupported("LayerNorm without affine weight and bias")
    _copy(dst.weight, src.weight)
    _copy(dst.bias, src.bias)


def from_hf(vision_model: nn.Module, visual_projection: nn.Linear) -> HookedViT:
    """HookedViT from a Hugging Face ``CLIPVisionTransformer`` and its ``visual_projection``."""
    config = vision_model.config
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
    if config.hidden_act not in act:
        raise _unsupported(f"Hugging Face hidden_act={config.hidden_act!r}")
    if visual_projection.bias is not None:
        raise _unsupported("visual projection with a bias")
    emb = vision_model.embeddings
    cfg = ViTConfig(
        image_size=_pair(config.image_size),
        patch_size=_pair(config.patch_size),
        width=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        mlp_width=config.intermediate_size,
        output_dim=visual_projection.out_features,
        act=act[config.hidden_act],
        ln_pre=True,
        layer_scale=False,
        ln_eps=float(config.layer_norm_eps),
        patch_bias=emb.patch_embedding.bias is not None,
    )
    vit = HookedViT(cfg)
    _copy(vit.patch_embed.weight, emb.patch_embedding.weight)
    if cfg.patch_bias:
        _copy(vit.patch_embed.bias, emb.patch_embedding.bias)
    _copy(vit.cls_embedding, emb.class_embedding)
    _copy(vit.pos_embedding, emb.position_embedding.weight)
    _copy_ln(vit.ln_pre, vision_model.pre_layrnorm)
    for ours, theirs in zip(vit.blocks, vision_model.encoder.layers):
        attn = theirs.self_attn
        _copy_ln(ours.ln1, theirs.layer_norm1)
        _copy(ours.qkv.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        _copy(ours.qkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        _copy(ours.out.weight, attn.out_proj.weight)
        _copy(ours.out.bias, attn.out_proj.bias)
        _copy_ln(ours.ln2, theirs.layer_norm2)
        _copy(ours.fc1.weight, theirs.mlp.fc1.weight)
        _copy(ours.fc1.bias, theirs.mlp.fc1.bias)
        _copy(ours.fc2.weight, theirs.mlp.fc2.weight)
        _copy(ours.fc2.bias, theirs.mlp.fc2.bias)
    _copy_ln(vit.ln_post, vision_model.post_layernorm)
    _copy(vit.proj, visual_projection.weight.T)
    return vit.eval()
