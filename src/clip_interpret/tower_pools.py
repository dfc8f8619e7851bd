"""How an open_clip native VisionTransformer pools its tokens (CLS, average, or CoCa's attentional pooler), and
whether it can be opened up at all, from its config alone (no torch): shared by the converter (``models.convert``),
the loader's refusals (``models.openclip.tower_problem``) and the torch-free table of ``clip-interpret models``
(``model_catalog``), so that the three judge alike."""

from __future__ import annotations

# a native VisionTransformer's config fields that the HookedViT cannot express
NATIVE_REFUSED = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                  "block_type")


# timm model modules whose trunks are not opened up, with the reason (the loader's refusals and the models table)
TIMM_FAMILIES = {
    "convnext": "a ConvNeXt trunk (convolutional stages: no attention heads to decompose)",
    "fastvit": "a FastViT trunk (MobileCLIP's convolutional and RepMixer stages: no attention heads to decompose)",
    "vision_transformer_hybrid": "a hybrid ViT whose patch embedding is a convolutional stem (MobileCLIP-B), not "
                                 "one linear map per patch",
    "vitamin": "a ViTamin trunk (convolutional MBConv stages before its attention blocks)",
    "swin_transformer": "a Swin Transformer trunk (attention in shifted windows with relative position biases)",
    "vision_transformer_relpos": "a ViT with relative position biases inside its attention",
    "naflexvit": "a NaFlex ViT (variable resolution and aspect ratio)",
}
OTHER_TIMM = "a timm trunk that is not a VisionTransformer"


def native_pool(pool_type: str, final_ln_after_pool: bool) -> str:
    """The HookedViT pooling of an open_clip VisionTransformer's ``pool_type`` and ``final_ln_after_pool``:
    "cls" or "avg", or, when it has none, why (a phrase). ``tok`` takes the CLS row, where LN_post before or
    after the pooling is the same; ``avg`` (the mean of the patch tokens) is expressed with LN_post after the
    pooling (CLIPA): one frozen scale per image."""
    if pool_type == "tok":
        return "cls"
    if pool_type == "avg":
        return "avg" if final_ln_after_pool else ("pool_type='avg' and LN_post before the pooling (only "
                                                  "final_ln_after_pool, as CLIPA has it, is supported)")
    return f"pool_type={pool_type!r} (only CLS-token pooling, or 'avg' with final_ln_after_pool)"


def native_tower_problem(vision: dict) -> str | None:
    """Why a native (not timm) open_clip image tower, given its ``vision_cfg``, cannot be opened up, or None."""
    if isinstance(vision.get("layers"), (list, tuple)):
        return "a ResNet image tower (no attention heads to decompose)"
    refused = [k for k in NATIVE_REFUSED if vision.get(k)]
    if refused:
        return f"a VisionTransformer with {refused[0]} (qk-norm or scaled attention)"
    pool = native_tower_pool(vision)
    if pool not in ("cls", "avg", "attn-pool"):
        return f"a VisionTransformer with {pool}"
    return None


def native_attn_pool(attentional_pool, pool_type: str) -> str:
    """The HookedViT pooling of a VisionTransformer with an attentional pooler (CoCa): "attn-pool", or why not
    (a phrase). open_clip's CoCa pooler (``attentional_pool: true``) is a multi-query attention pooler whose
    queries' outputs get LN_post; ``pool_type`` 'tok' makes the embedding its first query's row, which the
    HookedViT computes alone. The paper's 'parallel' and 'cascade' poolers (a string) are not expressed."""
    if isinstance(attentional_pool, str):
        return (f"attentional_pool={attentional_pool!r} (a second, contrastive pooler; only open_clip's CoCa "
                "pooler, attentional_pool true, is supported)")
    if pool_type != "tok":
        return (f"an attentional pooler read by pool_type={pool_type!r} (only 'tok', the first query, as CoCa "
                "reads it)")
    return "attn-pool"


def native_tower_pool(vision: dict) -> str:
    """The HookedViT pooling of a native VisionTransformer's ``vision_cfg`` ("cls", "avg" or "attn-pool"), or
    why it has none (a phrase)."""
    if vision.get("attentional_pool"):
        return native_attn_pool(vision["attentional_pool"], vision.get("pool_type", "tok"))
    return native_pool(vision.get("pool_type", "tok"), bool(vision.get("final_ln_after_pool", False)))
