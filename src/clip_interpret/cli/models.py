"""``models``: which models can be opened up (the paper's six, open_clip architectures, Hugging Face forms).

The table comes from ``model_catalog.model_table()``: the installed files, no torch."""

from __future__ import annotations


def cmd_models(args) -> int:
    from ..model_catalog import model_table

    table = model_table()
    print("The paper's six models (arXiv 2409.06579), as specs:")
    for spec in table["paper"]:
        print(f"  {spec}")
    print("\nopen_clip architectures with a supported image tower (open_clip:ARCH/TAG, open_clip:ARCH@FILE, or "
          "open_clip:ARCH for random weights);\n[pool] CLS token, avg (the patch tokens' mean, LayerNorm after "
          "it: CLIPA), MAP attention pooling (SigLIP) or attn-pool (CoCa's multi-query attentional pooler, the "
          "embedding its first query's row), "
          "[tokenizer] the text tower's (a Hugging Face one loads from its cache or the Hub, or --tokenizer FOLDER):")
    for arch, pool, tokenizer, tags in table["open_clip"]:
        print(f"  {arch:<30} [{pool}] [{tokenizer}] {', '.join(tags) if tags else '(no pretrained tags)'}")
    print("\nHugging Face: hf:ORG/NAME or hf:/path/to/folder for a CLIPModel, a SiglipModel, or a Siglip2Model "
          "(decomposed at its fixed native grid; NaFlex inputs of other sizes are not).")
    print("\nopen_clip architectures refused, and why (loading one says so in one line):")
    for arch, reason in table.get("refused", []):
        print(f"  {arch:<30} {reason}")
    print("\nNot supported either: timm ViTs pooled otherwise than by a MAP head; NaFlex variants (variable "
          "resolution); the parallel / cascade CoCa poolers; towers averaged after their final LayerNorm "
          "(pool_type avg without final_ln_after_pool); qk-norm / scaled-cosine attention blocks; Eva trunks "
          "with qk-norm, register tokens or other rotary kinds.")
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="list supported architectures and the paper's six models")
    p.set_defaults(func=cmd_models)
