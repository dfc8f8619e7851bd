"""Check, not a test: big image towers at full depth with random weights (too large for the suite).

The tests check ViT-H-14, ViT-bigG-14 and the SigLIP trunks at their real width with one or two
blocks; this builds whole towers (ViT-bigG-14: 1.8 B image parameters, about 15 GB of memory
while the native tower and ours are both held) and prints, per architecture, the relative
error of our forward against open_clip's ``encode_image`` (target < 1e-5, fp32) and the largest
gap between the sum of the decomposition's pieces (every layer) and the unit embedding.

    python bench/full_towers.py [ARCH ...]   (default: ViT-H-14-quickgelu ViT-SO400M-14-SigLIP-384 ViT-bigG-14
                                              ViT-L-14-CLIPA EVA01-g-14 coca_ViT-L-14 PE-Core-L-14-336
                                              EVA02-L-14)

A CoCa model's caption decoder is built with one layer (it is not part of the image tower).
"""

from __future__ import annotations

import gc
import sys
import time

import torch

TINY_TEXT = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)


def check(arch: str) -> str:
    from clip_interpret.decompose import decompose_pixels
    from clip_interpret.models.convert import from_open_clip
    from clip_interpret.models.loader import registered_open_clip

    start = time.time()
    torch.manual_seed(0)
    open_clip = registered_open_clip()
    decoder = open_clip.get_model_config(arch).get("multimodal_cfg")
    small = dict(multimodal_cfg=dict(decoder, layers=1, width=16, heads=2)) if decoder else {}
    native = open_clip.create_model(arch, pretrained=None, text_cfg=TINY_TEXT, **small).eval()
    vit = from_open_clip(native.visual)
    x = torch.randn(1, 3, *vit.cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, ours = native.encode_image(x, normalize=False), vit(x)  # CoCa's normalises by default
    del native
    gc.collect()
    d = decompose_pixels(vit, x, layers="all")
    return (f"{arch:<28} {vit.cfg.layers:>3} layers  rel. error {float((ours - reference).norm() / reference.norm()):.1e}"
            f"  |total - embedding| {float((d.total() - d.embedding).abs().max()):.1e}  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" notice
    for name in sys.argv[1:] or ["ViT-H-14-quickgelu", "ViT-SO400M-14-SigLIP-384", "ViT-bigG-14", "ViT-L-14-CLIPA",
                                 "EVA01-g-14", "coca_ViT-L-14", "PE-Core-L-14-336", "EVA02-L-14"]:
        print(check(name), flush=True)
