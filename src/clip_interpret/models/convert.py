"""Convert open_clip and Hugging Face CLIP image towers into a HookedViT.

Each converter reads the native module's configuration, refuses what the
decomposition cannot express (with a message naming what is supported), and
copies the weights. Equality with the native forward is checked in the tests.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..tower_pools import native_attn_pool, native_pool
from .hooked_vit import HookedViT, ViTConfig
from .rotary import table_from_timm

SUPPORTED = (
    "ViT image towers with CLS pooling (open_clip VisionTransformer: quick_gelu or gelu, with or without "
    "LayerScale, any patch and image size; Hugging Face CLIP vision towers), open_clip VisionTransformers "
    "average-pooled over the patch tokens with the final LayerNorm after pooling (CLIPA) or pooled by CoCa's "
    "multi-query attentional pooler (its first query), and ViTs without a CLS token "
    "pooled by a MAP attention head (SigLIP and SigLIP 2: open_clip's timm VisionTransformer trunks with "
    "global_pool='map', Hugging Face SiglipModel, and Siglip2Model at its fixed native grid); EVA01-CLIP towers "
    "(open_clip's timm Eva trunks with plain pre-norm blocks, absolute position embeddings and CLS pooling) and Eva "
    "trunks pooled by a MAP attention head, with or without a class token (Perception Encoder's layout)"
)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported image tower: {what}. Supported: {SUPPORTED}.")


def _activation_name(module: nn.Module) -> str:
    kind = type(module).__name__
    if kind == "QuickGELU":
        return "quick_gelu"
    if kind == "GELUTanh":  # timm's
        return "gelu_tanh"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if kind == "GELU" and not hasattr(module, "approximate"):  # timm's exact GELU
        return "gelu"
    if isinstance(module, nn.SiLU):  # SwiGLU's
        return "silu"
    raise _unsupported(f"MLP activation {kind}")


HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh"}


def _hf_activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise _unsupported(f"Hugging Face hidden_act={name!r}")
    return HF_ACTIVATIONS[name]


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.detach().to(dst.dtype).reshape(dst.shape))


def from_open_clip(visual: nn.Module) -> HookedViT:
    """HookedViT from an open_clip image tower (``model.visual``): a ``VisionTransformer``, or a
    ``TimmModel`` whose trunk is a timm ``VisionTransformer`` pooled by a MAP head (SigLIP)."""
    kind = type(visual).__name__
    if kind == "TimmModel":
        return _from_eva(visual) if type(visual.trunk).__name__ == "Eva" else _from_timm(visual)
    if kind != "VisionTransformer":
        raise _unsupported(f"open_clip {kind} (a ResNet tower has no attention heads to decompose)")
    coca = getattr(visual, "attn_pool", None) is not None
    if coca:
        pool = native_attn_pool(getattr(visual, "attn_pool_type", "") or True, getattr(visual, "pool_type", "tok"))
    else:
        pool = native_pool(getattr(visual, "pool_type", "tok"), bool(getattr(visual, "final_ln_after_pool", False)))
    if pool not in ("cls", "avg", "attn-pool"):
        raise _unsupported(pool)
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
        pool=pool,
        **(_coca_config(visual.attn_pool, float(first.ln_1.eps)) if coca else {}),
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
    if coca:
        _copy_coca_pool(vit, visual.attn_pool, visual.ln_post)
    else:
        _copy_ln(vit.ln_post, visual.ln_post)
    _copy(vit.proj, proj)
    return vit.eval()


# ----------------------------------------------------------------- CoCa's attentional pooler
def _coca_config(pooler: nn.Module, eps: float) -> dict:
    """The ViTConfig fields of open_clip's ``AttentionalPooler`` (CoCa), or a refusal naming what it has."""
    attn = pooler.attn
    if type(pooler).__name__ != "AttentionalPooler" or not isinstance(attn, nn.MultiheadAttention):
        raise _unsupported(f"an attentional pooler {type(pooler).__name__} (only open_clip's AttentionalPooler)")
    if attn.bias_k is not None or attn.add_zero_attn or attn.in_proj_bias is None:
        raise _unsupported("an attentional pooler with added key/value biases, zero attention or no biases")
    norms = (pooler.ln_q, pooler.ln_k)
    if not all(isinstance(n, nn.LayerNorm) for n in norms) or {float(n.eps) for n in norms} != {eps}:
        raise _unsupported("an attentional pooler whose LayerNorms differ from the blocks'")
    return dict(pool_heads=attn.num_heads, pool_width=attn.embed_dim)


def _copy_coca_pool(vit: HookedViT, pooler: nn.Module, ln_post: nn.Module) -> None:
    """The pooler's first query, LN_q, q/k/v and output projections; its LN_k (over every token) becomes the
    HookedViT's ``ln_post``, open_clip's ``ln_post`` (over the pooled rows) the pool's ``ln``."""
    attn, ours, e = pooler.attn, vit.pool, vit.cfg.pool_width
    if attn._qkv_same_embed_dim:
        w_q, w_k, w_v = attn.in_proj_weight.split(e)
    else:
        w_q, w_k, w_v = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    _copy(ours.query, pooler.query[0])
    _copy_ln(ours.ln_q, pooler.ln_q)
    _copy(ours.q.weight, w_q)
    _copy(ours.q.bias, attn.in_proj_bias[:e])
    _copy(ours.kv.weight, torch.cat([w_k, w_v]))
    _copy(ours.kv.bias, attn.in_proj_bias[e:])
    _copy(ours.out.weight, attn.out_proj.weight)
    _copy_bias(ours.out.bias, attn.out_proj.bias)
    _copy_ln(vit.ln_post, pooler.ln_k)
    _copy_ln(ours.ln, ln_post)


def _copy_ln(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    if src.weight is None or src.bias is None:
        raise _unsupported("LayerNorm without affine weight and bias")
    _copy(dst.weight, src.weight)
    _copy(dst.bias, src.bias)


def from_hf(vision_model: nn.Module, visual_projection: nn.Linear) -> HookedViT:
    """HookedViT from a Hugging Face ``CLIPVisionTransformer`` and its ``visual_projection``."""
    config = vision_model.config
    act = _hf_activation(config.hidden_act)
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
        act=act,
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
    _copy_hf_layers(vit, vision_model.encoder.layers)
    _copy_ln(vit.ln_post, vision_model.post_layernorm)
    _copy(vit.proj, visual_projection.weight.T)
    return vit.eval()


def _copy_hf_layers(vit: HookedViT, layers) -> None:
    """Weights of Hugging Face CLIP / SigLIP encoder layers (pre-norm, separate q, k, v projections)."""
    for ours, theirs in zip(vit.blocks, layers):
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


def _copy_bias(dst: torch.Tensor, src: torch.Tensor | None) -> None:
    """A bias, or zeros where the native layer has none."""
    if src is None:
        with torch.no_grad():
            dst.zero_()
    else:
        _copy(dst, src)


# ----------------------------------------------------------------- MAP (SigLIP)
def check_timm_trunk(trunk: nn.Module) -> None:
    """Refuse a timm trunk the HookedViT cannot express, naming what it has (works on the meta device)."""
    kind = type(trunk).__name__
    if kind == "Eva":
        check_eva_trunk(trunk)
        return
    if kind != "VisionTransformer":
        raise _unsupported(f"timm {kind} trunk (no ViT attention heads to decompose)")
    if getattr(trunk, "global_pool", "") != "map" or getattr(trunk, "attn_pool", None) is None:
        raise _unsupported(f"timm VisionTransformer with global_pool={trunk.global_pool!r} (only 'map', SigLIP's "
                           "attention pooling, for timm trunks)")
    if trunk.cls_token is not None or trunk.reg_token is not None:
        raise _unsupported("a timm MAP trunk with class or register tokens")
    if getattr(trunk, "dynamic_img_size", False):
        raise _unsupported("timm dynamic_img_size")
    patch = trunk.patch_embed
    if type(patch).__name__ != "PatchEmbed" or not isinstance(patch.proj, nn.Conv2d) \
            or not isinstance(patch.norm, nn.Identity) or getattr(patch, "dynamic_img_pad", False):
        raise _unsupported(f"patch embedding {type(patch).__name__} (only a plain convolution)")
    if trunk.pos_embed is None:
        raise _unsupported("no position embedding")
    for name in ("norm_pre", "norm"):
        module = getattr(trunk, name)
        if not isinstance(module, (nn.Identity, nn.LayerNorm)) or (name == "norm" and isinstance(module, nn.Identity)):
            raise _unsupported(f"timm {name} {type(module).__name__}")
    if not isinstance(trunk.fc_norm, nn.Identity):
        raise _unsupported("timm fc_norm after pooling")
    block = trunk.blocks[0]
    attn = getattr(block, "attn", None)
    if type(block).__name__ != "Block" or type(attn).__name__ != "Attention" \
            or not all(isinstance(getattr(attn, n), nn.Identity) for n in ("q_norm", "k_norm", "norm")) \
            or getattr(attn, "gate", None) is not None:
        raise _unsupported(f"timm {type(block).__name__} blocks with {type(attn).__name__} "
                           "(qk-norm, gated or normalised attention)")
    if type(block.mlp).__name__ != "Mlp" or not isinstance(block.mlp.norm, nn.Identity):
        raise _unsupported(f"timm {type(block.mlp).__name__} MLP (only fc1, activation, fc2)")
    pool = trunk.attn_pool
    if type(pool).__name__ != "AttentionPoolLatent" or pool.latent_len != 1 or pool.pos_embed is not None \
            or not isinstance(pool.q_norm, nn.Identity) or not isinstance(pool.k_norm, nn.Identity) \
            or not isinstance(pool.q, nn.Linear) or pool.mlp is None or pool.pool != "token":
        raise _unsupported("an attention-pooling head other than one latent query with q/kv projections and "
                           "an MLP (AttentionPoolLatent)")
    if _activation_name(pool.mlp.act) != _activation_name(block.mlp.act):
        raise _unsupported("a pooling MLP activation other than the blocks'")
    if not isinstance(trunk.head, nn.Identity):
        raise _unsupported("a timm classifier head on the trunk (use proj 'none' or 'linear')")


def _timm_projection(visual: nn.Module) -> torch.Tensor | None:
    """open_clip TimmModel's projection after the trunk as [width, D], or None (proj 'none')."""
    layers = [m for m in visual.head if not isinstance(m, nn.Dropout)]
    if not layers:
        return None
    if len(layers) == 1 and isinstance(layers[0], nn.Linear) and layers[0].bias is None:
        return layers[0].weight.T
    raise _unsupported("a timm projection other than one linear map without bias (proj 'mlp' or a bias)")


def check_open_clip_tower(visual: nn.Module) -> None:
    """Refuse an open_clip ``TimmModel`` the converter cannot express (works on the meta device)."""
    check_timm_trunk(visual.trunk)
    if type(visual.trunk).__name__ == "Eva":
        _eva_projection(visual)
    else:
        _timm_projection(visual)


# ----------------------------------------------------------------- EVA01 (timm Eva)
def eva_missing(trunk: nn.Module) -> list[str]:
    """What a timm ``Eva`` trunk has that the HookedViT does not express (empty: an EVA01-like trunk,
    plain pre-norm blocks, absolute position embeddings, CLS pooling). Judged on block 0 and the
    trunk's modules, so it works on the meta device and on a one-block build."""
    missing = []
    block = trunk.blocks[0]
    attn = block.attn
    rope = getattr(trunk, "rope", None)
    if rope is not None:
        if type(rope).__name__ != "RotaryEmbeddingCat" or getattr(trunk, "rope_mixed", False):
            missing.append(f"rotary position embeddings of kind {type(rope).__name__} (only rope_type='cat')")
        elif getattr(attn, "num_prefix_tokens", None) != int(trunk.cls_token is not None) + \
                (trunk.reg_token.shape[1] if trunk.reg_token is not None else 0):
            missing.append("rotary embeddings that skip other tokens than the prefix tokens")
    if type(block).__name__ not in ("EvaBlock", "EvaBlockPostNorm"):
        missing.append(f"{type(block).__name__} blocks")
    if type(attn).__name__ not in ("EvaAttention", "AttentionRope"):
        missing.append(f"{type(attn).__name__} attention")
    else:
        missing += _rope_attention_missing(trunk, attn)
        if not isinstance(attn.norm, (nn.Identity, nn.LayerNorm)):
            missing.append(f"a {type(attn.norm).__name__} over the concatenated heads (only a LayerNorm)")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            missing.append("qk-norm")
        if getattr(attn, "gate", None) is not None:
            missing.append("gated attention")
        if attn.head_dim * attn.num_heads != trunk.embed_dim:
            missing.append("a head width other than width / heads")
    mlp = block.mlp
    if type(mlp).__name__ == "GluMlp" and (mlp.gate_last or mlp.chunk_dim != -1):
        missing.append("a gated MLP with its gate in the second half (gate_last)")
    elif type(mlp).__name__ not in ("Mlp", "SwiGLU", "GluMlp"):
        missing.append(f"a {type(mlp).__name__} MLP")
    if not isinstance(getattr(mlp, "norm", None), (nn.Identity, nn.LayerNorm, type(None))):
        missing.append(f"a {type(mlp.norm).__name__} inside the MLP (only a LayerNorm)")
    if getattr(block, "gamma_1", None) is not None and getattr(block, "gamma_2", None) is None:
        missing.append("LayerScale on the attention branch only")
    pool = getattr(trunk, "global_pool", "")
    if pool == "map":
        missing += _eva_map_missing(trunk)
    elif pool != "token" or getattr(trunk, "attn_pool", None) is not None:
        missing.append(f"global_pool={pool!r} (only 'token', CLS pooling, or 'map', attention pooling, "
                       "for Eva trunks)")
    if trunk.cls_token is None and pool != "map":
        missing.append("no class token")
    if trunk.reg_token is not None:
        missing.append("register tokens")
    if trunk.pos_embed is None or getattr(trunk, "no_embed_class", False):
        missing.append("no position embedding of the class token")
    if getattr(trunk, "dynamic_img_size", False):
        missing.append("dynamic_img_size")
    patch = trunk.patch_embed
    if type(patch).__name__ != "PatchEmbed" or not isinstance(patch.proj, nn.Conv2d) \
            or not isinstance(patch.norm, nn.Identity) or getattr(patch, "dynamic_img_pad", False):
        missing.append(f"patch embedding {type(patch).__name__} other than a plain convolution")
    if not isinstance(trunk.norm, nn.LayerNorm):
        missing.append(f"final norm {type(trunk.norm).__name__} (only a LayerNorm)")
    if not isinstance(trunk.fc_norm, nn.Identity):
        missing.append("a norm after pooling (fc_norm)")
    if not isinstance(trunk.norm_pre, (nn.Identity, nn.LayerNorm)):
        missing.append(f"pre-norm {type(trunk.norm_pre).__name__}")
    if not missing:
        norms = [block.norm1, block.norm2, trunk.norm] + [n for n in (trunk.norm_pre, attn.norm,
                                                                      getattr(mlp, "norm", None))
                                                           if isinstance(n, nn.LayerNorm)]
        norms += [trunk.attn_pool.norm] if trunk.attn_pool is not None else []
        if len({float(n.eps) for n in norms}) != 1:
            missing.append("LayerNorms with different eps")
        _activation_name(mlp.act)
    return missing


def _rope_attention_missing(trunk: nn.Module, attn: nn.Module) -> list[str]:
    """What timm's ``AttentionRope`` (``attn_type='rope'``, Perception Encoder's) has beyond plain multi-head
    attention with fused or separate q/k/v (its rotary embedding is judged with the trunk's rope)."""
    if type(attn).__name__ != "AttentionRope":
        return []
    return ["grouped-query attention (num_kv_heads)"] if getattr(attn, "num_kv_groups", 1) != 1 else []


def _eva_map_missing(trunk: nn.Module) -> list[str]:
    """What an Eva trunk's attention-pooling head (``global_pool='map'``, Perception Encoder's) has beyond
    one latent query with q/kv projections, an output projection and an MLP after a LayerNorm (SigLIP's)."""
    pool = getattr(trunk, "attn_pool", None)
    if type(pool).__name__ != "AttentionPoolLatent" or pool.latent_len != 1 or pool.pos_embed is not None \
            or not isinstance(pool.q_norm, nn.Identity) or not isinstance(pool.k_norm, nn.Identity) \
            or not isinstance(pool.q, nn.Linear) or pool.mlp is None or pool.pool != "token" \
            or not isinstance(pool.norm, nn.LayerNorm) or pool.latent_dim != trunk.embed_dim:
        return ["an attention-pooling head other than one latent query with q/kv projections and an MLP "
                "(AttentionPoolLatent)"]
    if type(pool.mlp).__name__ != "Mlp" or not isinstance(pool.mlp.norm, nn.Identity) \
            or _activation_name(pool.mlp.act) != _activation_name(trunk.blocks[0].mlp.act):
        return ["a pooling MLP other than fc1, the blocks' activation, fc2"]
    return []


def check_eva_trunk(trunk: nn.Module) -> None:
    """Refuse a timm ``Eva`` trunk with a piece the HookedViT does not express, naming every such piece."""
    missing = eva_missing(trunk)
    if missing:
        raise _unsupported(f"timm Eva trunk with {', '.join(missing)} (pieces not decomposed)")


def _eva_projection(visual: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one linear map after an Eva trunk's pooled CLS row as ([width, D], bias or None): the trunk's
    classifier head (open_clip's ``timm_proj: null``, EVA01-CLIP's, with its bias) or open_clip's
    ``proj: linear``."""
    layers = [m for m in (visual.trunk.head, *visual.head) if not isinstance(m, (nn.Dropout, nn.Identity))]
    if len(layers) == 1 and isinstance(layers[0], nn.Linear):
        return layers[0].weight.T, layers[0].bias
    raise _unsupported("an Eva trunk whose projection is not one linear map (proj 'mlp', 'none' or two maps)")


def _rope_fields(trunk: nn.Module) -> dict:
    """The ``ViTConfig`` rotary fields of a timm Eva trunk (``rope``, ``rope_prefix``); none without rotary
    embeddings. The pairs' layout is the blocks' attention's (``rotate_half``); the tokens left alone are
    its ``num_prefix_tokens``."""
    if getattr(trunk, "rope", None) is None:
        return {}
    attn = trunk.blocks[0].attn
    return dict(rope="half" if getattr(attn, "rotate_half", False) else "interleaved",
                rope_prefix=int(attn.num_prefix_tokens))


def _copy_rope(vit: HookedViT, trunk: nn.Module) -> None:
    """The rotary sin/cos table of the trunk's fixed grid into ``vit.rope_table`` (``rotary.table_from_timm``)."""
    if vit.rope_table is None:
        return
    try:
        table = table_from_timm(trunk.rope, vit.cfg.grid, vit.cfg.head_dim)
    except ValueError as err:
        raise _unsupported(str(err)) from None
    _copy(vit.rope_table, table)


def _eva_mlp_fields(block: nn.Module) -> dict:
    """The ``ViTConfig`` MLP fields of an Eva block: its hidden width, activation, gating (SwiGLU: timm's
    ``SwiGLU`` with fc1_g and fc1_x, or ``GluMlp`` with one packed fc1, gate first) and sub-LN (scale_mlp)."""
    mlp = block.mlp
    kind = type(mlp).__name__
    width = mlp.fc1_g.out_features if kind == "SwiGLU" else mlp.fc1.out_features // (2 if kind == "GluMlp" else 1)
    return dict(mlp_width=width, act=_activation_name(mlp.act), glu=kind in ("SwiGLU", "GluMlp"),
                mlp_ln=isinstance(getattr(mlp, "norm", None), nn.LayerNorm))


def _copy_eva_mlp(ours, mlp: nn.Module) -> None:
    """An Eva block's MLP weights: SwiGLU's fc1_g and fc1_x stacked as fc1's rows [gate; value]."""
    if type(mlp).__name__ == "SwiGLU":
        _copy(ours.fc1.weight, torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight]))
        biases = [b if b is not None else torch.zeros(mlp.fc1_g.out_features) for b in (mlp.fc1_g.bias, mlp.fc1_x.bias)]
        _copy(ours.fc1.bias, torch.cat(biases))
    else:
        _copy(ours.fc1.weight, mlp.fc1.weight)
        _copy_bias(ours.fc1.bias, mlp.fc1.bias)
    if ours.mlp_ln is not None:
        _copy_ln(ours.mlp_ln, mlp.norm)
    _copy(ours.fc2.weight, mlp.fc2.weight)
    _copy_bias(ours.fc2.bias, mlp.fc2.bias)


def _from_eva(visual: nn.Module) -> HookedViT:
    """HookedViT from an open_clip ``TimmModel`` whose trunk is a timm ``Eva``: EVA01's plain pre-norm blocks
    (EVA's attention, fused or separate q/k/v, the key without a bias; or timm's ``AttentionRope``, Perception
    Encoder's, its q/k/v rows laid out as ours), EVA02's pieces (rotary embeddings 'cat', a SwiGLU MLP with its
    sub-LN, a LayerNorm over the concatenated heads, post-norm blocks), CLS pooling or a MAP attention-pooling
    head over every token (the class token's row included, when there is one), and a linear head."""
    check_open_clip_tower(visual)
    trunk = visual.trunk
    proj, proj_bias = _eva_projection(visual)
    blocks = trunk.blocks
    first = blocks[0]
    layer_scale = getattr(first, "gamma_1", None) is not None
    attn_pool = trunk.attn_pool  # Perception Encoder's MAP head, or None (CLS pooling)
    post_norm = type(first).__name__ == "EvaBlockPostNorm"
    rope = _rope_fields(trunk)
    cfg = ViTConfig(
        image_size=_pair(trunk.patch_embed.img_size),
        patch_size=_pair(trunk.patch_embed.patch_size),
        width=trunk.embed_dim,
        layers=len(blocks),
        heads=first.attn.num_heads,
        output_dim=proj.shape[1],
        **_eva_mlp_fields(first),
        attn_ln=isinstance(first.attn.norm, nn.LayerNorm),
        post_norm=post_norm,
        ln_pre=isinstance(trunk.norm_pre, nn.LayerNorm),
        layer_scale=layer_scale,
        ln_eps=float(first.norm1.eps),
        patch_bias=trunk.patch_embed.proj.bias is not None,
        proj_bias=proj_bias is not None,
        class_token=trunk.cls_token is not None,
        pool="map" if attn_pool is not None else "cls",
        pool_heads=attn_pool.num_heads if attn_pool is not None else 0,
        pool_mlp_width=attn_pool.mlp.fc1.out_features if attn_pool is not None else 0,
        **rope,
    )
    vit = HookedViT(cfg)
    _copy_rope(vit, trunk)
    _copy(vit.patch_embed.weight, trunk.patch_embed.proj.weight)
    if cfg.patch_bias:
        _copy(vit.patch_embed.bias, trunk.patch_embed.proj.bias)
    if cfg.class_token:
        _copy(vit.cls_embedding, trunk.cls_token)
    _copy(vit.pos_embedding, trunk.pos_embed)
    if cfg.ln_pre:
        _copy_ln(vit.ln_pre, trunk.norm_pre)
    for ours, theirs in zip(vit.blocks, blocks):
        attn = theirs.attn
        _copy_ln(ours.ln1 if not post_norm else ours.ln1_post, theirs.norm1)
        if attn.qkv is not None:
            _copy(ours.qkv.weight, attn.qkv.weight)
            biases = _fused_qkv_biases(attn)
        else:
            _copy(ours.qkv.weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            biases = (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
        w = cfg.width
        for part, bias in enumerate(biases):  # EVA's key has no bias (a zero buffer)
            _copy_bias(ours.qkv.bias[part * w:(part + 1) * w], bias)
        if ours.ln_inner is not None:
            _copy_ln(ours.ln_inner, attn.norm)
        _copy(ours.out.weight, attn.proj.weight)
        _copy_bias(ours.out.bias, attn.proj.bias)
        _copy_ln(ours.ln2 if not post_norm else ours.ln2_post, theirs.norm2)
        _copy_eva_mlp(ours, theirs.mlp)
        if layer_scale:
            _copy(ours.ls1, theirs.gamma_1)
            _copy(ours.ls2, theirs.gamma_2)
    _copy_ln(vit.ln_post, trunk.norm)
    if attn_pool is not None:
        _copy_attention_pool(vit.pool, attn_pool)
    _copy(vit.proj, proj)
    if proj_bias is not None:
        _copy(vit.proj_bias, proj_bias)
    return vit.eval()


def _fused_qkv_biases(attn: nn.Module) -> tuple:
    """The query, key and value biases of an Eva trunk's fused q/k/v projection: EVA's own attention keeps
    them apart (``q_bias``, ``v_bias``; the key's a zero buffer, or none at all), timm's ``AttentionRope``
    (Perception Encoder's) in the projection (or none)."""
    if hasattr(attn, "q_bias"):
        return attn.q_bias, attn.k_bias, attn.v_bias
    return attn.qkv.bias.chunk(3) if attn.qkv.bias is not None else (None, None, None)


def _from_timm(visual: nn.Module) -> HookedViT:
    """HookedViT from an open_clip ``TimmModel`` whose trunk is a timm MAP VisionTransformer (SigLIP)."""
    check_open_clip_tower(visual)
    trunk = visual.trunk
    proj = _timm_projection(visual)
    blocks = trunk.blocks
    first = blocks[0]
    width = trunk.embed_dim
    cfg = ViTConfig(
        image_size=_pair(trunk.patch_embed.img_size),
        patch_size=_pair(trunk.patch_embed.patch_size),
        width=width,
        layers=len(blocks),
        heads=first.attn.num_heads,
        mlp_width=first.mlp.fc1.out_features,
        output_dim=proj.shape[1] if proj is not None else width,
        act=_activation_name(first.mlp.act),
        ln_pre=isinstance(trunk.norm_pre, nn.LayerNorm),
        layer_scale=type(first.ls1).__name__ == "LayerScale",
        ln_eps=float(first.norm1.eps),
        patch_bias=trunk.patch_embed.proj.bias is not None,
        class_token=False,
        pool="map",
        pool_heads=trunk.attn_pool.num_heads,
        pool_mlp_width=trunk.attn_pool.mlp.fc1.out_features,
        proj=proj is not None,
    )
    vit = HookedViT(cfg)
    _copy(vit.patch_embed.weight, trunk.patch_embed.proj.weight)
    if cfg.patch_bias:
        _copy(vit.patch_embed.bias, trunk.patch_embed.proj.bias)
    _copy(vit.pos_embedding, trunk.pos_embed)
    if cfg.ln_pre:
        _copy_ln(vit.ln_pre, trunk.norm_pre)
    for ours, theirs in zip(vit.blocks, blocks):
        _copy_ln(ours.ln1, theirs.norm1)
        _copy(ours.qkv.weight, theirs.attn.qkv.weight)
        _copy_bias(ours.qkv.bias, theirs.attn.qkv.bias)
        _copy(ours.out.weight, theirs.attn.proj.weight)
        _copy_bias(ours.out.bias, theirs.attn.proj.bias)
        _copy_ln(ours.ln2, theirs.norm2)
        _copy(ours.fc1.weight, theirs.mlp.fc1.weight)
        _copy_bias(ours.fc1.bias, theirs.mlp.fc1.bias)
        _copy(ours.fc2.weight, theirs.mlp.fc2.weight)
        _copy_bias(ours.fc2.bias, theirs.mlp.fc2.bias)
        if cfg.layer_scale:
            _copy(ours.ls1, theirs.ls1.gamma)
            _copy(ours.ls2, theirs.ls2.gamma)
    _copy_ln(vit.ln_post, trunk.norm)
    _copy_attention_pool(vit.pool, trunk.attn_pool)
    if proj is not None:
        _copy(vit.proj, proj)
    return vit.eval()


def _copy_attention_pool(ours: nn.Module, pool: nn.Module) -> None:
    """The weights of timm's ``AttentionPoolLatent`` (one latent query, q and kv projections, its MLP) into
    our ``AttentionPool`` (SigLIP's trunks and Perception Encoder's)."""
    _copy(ours.query, pool.latent)
    _copy(ours.q.weight, pool.q.weight)
    _copy_bias(ours.q.bias, pool.q.bias)
    _copy(ours.kv.weight, pool.kv.weight)
    _copy_bias(ours.kv.bias, pool.kv.bias)
    _copy(ours.out.weight, pool.proj.weight)
    _copy_bias(ours.out.bias, pool.proj.bias)
    _copy_ln(ours.ln, pool.norm)
    _copy(ours.fc1.weight, pool.mlp.fc1.weight)
    _copy_bias(ours.fc1.bias, pool.mlp.fc1.bias)
    _copy(ours.fc2.weight, pool.mlp.fc2.weight)
    _copy_bias(ours.fc2.bias, pool.mlp.fc2.bias)


def from_hf_siglip(vision_model: nn.Module) -> HookedViT:
    """HookedViT from a Hugging Face ``SiglipVisionTransformer``, or a ``Siglip2VisionTransformer``
    at its fixed native grid (the patch grid of its position embeddings; NaFlex inputs of other
    sizes and aspect ratios are not expressed)."""
    config = vision_model.config
    if not getattr(vision_model, "use_head", getattr(config, "vision_use_head", True)):
        raise _unsupported("a SigLIP vision tower without its attention-pooling head (vision_use_head=False)")
    emb = vision_model.embeddings
    patch = _pair(config.patch_size)
    if isinstance(emb.patch_embedding, nn.Linear):  # SigLIP 2: patches flattened as (row, column, channel)
        side = int(round(emb.position_embedding.num_embeddings ** 0.5))
        if side * side != emb.position_embedding.num_embeddings:
            raise _unsupported("SigLIP 2 position embeddings that are not a square grid")
        image_size = (side * patch[0], side * patch[1])
        conv = emb.patch_embedding.weight.reshape(-1, patch[0], patch[1], config.num_channels).permute(0, 3, 1, 2)
    else:
        image_size = _pair(config.image_size)
        conv = emb.patch_embedding.weight
    head = vision_model.head
    cfg = ViTConfig(
        image_size=image_size,
        patch_size=patch,
        width=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        mlp_width=config.intermediate_size,
        output_dim=config.hidden_size,
        act=_hf_activation(config.hidden_act),
        ln_pre=False,
        ln_eps=float(config.layer_norm_eps),
        patch_bias=emb.patch_embedding.bias is not None,
        class_token=False,
        pool="map",
        pool_heads=head.attention.num_heads,
        pool_mlp_width=head.mlp.fc1.out_features,
        proj=False,
    )
    vit = HookedViT(cfg)
    _copy(vit.patch_embed.weight, conv)
    if cfg.patch_bias:
        _copy(vit.patch_embed.bias, emb.patch_embedding.bias)
    _copy(vit.pos_embedding, emb.position_embedding.weight)
    _copy_hf_layers(vit, vision_model.encoder.layers)
    _copy_ln(vit.ln_post, vision_model.post_layernorm)
    w = cfg.width
    attention = head.attention  # torch MultiheadAttention: in_proj rows [W_Q; W_K; W_V]
    pool = vit.pool
    _copy(pool.query, head.probe)
    _copy(pool.q.weight, attention.in_proj_weight[:w])
    _copy(pool.q.bias, attention.in_proj_bias[:w])
    _copy(pool.kv.weight, attention.in_proj_weight[w:])
    _copy(pool.kv.bias, attention.in_proj_bias[w:])
    _copy(pool.out.weight, attention.out_proj.weight)
    _copy(pool.out.bias, attention.out_proj.bias)
    _copy_ln(pool.ln, head.layernorm)
    _copy(pool.fc1.weight, head.mlp.fc1.weight)
    _copy(pool.fc1.bias, head.mlp.fc1.bias)
    _copy(pool.fc2.weight, head.mlp.fc2.weight)
    _copy(pool.fc2.bias, head.mlp.fc2.bias)
    return vit.eval()
