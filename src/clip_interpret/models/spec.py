"""Model spec strings: one string names a model.

    open_clip:ARCH/TAG     pretrained weights by tag      open_clip:ViT-B-32/openai
    open_clip:ARCH@PATH    a local checkpoint file        open_clip:ViT-B-16@/ckpt/epoch_32.pt
    open_clip:ARCH         random initialisation          open_clip:ViT-B-32
    hf:ORG/NAME            a Hugging Face model id        hf:openai/clip-vit-base-patch32
    hf:PATH or PATH        a local Hugging Face folder    hf:./my-clip   (a folder with config.json)
    toy                    the bundled toy CLIP           toy
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

SPEC_HELP = (
    "model specs: toy (the bundled toy CLIP), open_clip:ARCH/TAG (pretrained tag), open_clip:ARCH@PATH (local checkpoint), "
    "open_clip:ARCH (random weights), hf:ORG/NAME (Hugging Face id), hf:PATH or PATH (local Hugging Face folder); "
    "`clip-interpret models` lists architectures"
)


@dataclass(frozen=True)
class ModelSpec:
    source: str  # "open_clip", "hf" or "toy"
    arch: str = ""  # open_clip architecture name
    tag: str = ""  # open_clip pretrained tag
    path: str = ""  # local checkpoint file (open_clip) or folder (hf)
    hf_id: str = ""  # Hugging Face repository id

    @property
    def random(self) -> bool:
        return self.source == "open_clip" and not self.tag and not self.path


def parse_spec(spec: str) -> ModelSpec:
    """Parse a spec string; raise ``ModelLoadError`` with the accepted forms if it is malformed."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"empty model spec; {SPEC_HELP}")
    text = spec.strip()
    if text == "toy":
        return ModelSpec("toy")
    if text.startswith("open_clip:"):
        body = text[len("open_clip:"):]
        if "@" in body:
            arch, path = body.split("@", 1)
            if not arch or not path:
                raise ModelLoadError(f"bad spec {spec!r}: expected open_clip:ARCH@PATH; {SPEC_HELP}")
            return ModelSpec("open_clip", arch=arch, path=path)
        if "/" in body:
            arch, tag = body.split("/", 1)
            if not arch or not tag:
                raise ModelLoadError(f"bad spec {spec!r}: expected open_clip:ARCH/TAG; {SPEC_HELP}")
            return ModelSpec("open_clip", arch=arch, tag=tag)
        if not body:
            raise ModelLoadError(f"bad spec {spec!r}: no architecture named; {SPEC_HELP}")
        return ModelSpec("open_clip", arch=body)
    if text.startswith("hf:"):
        body = text[len("hf:"):]
        if not body:
            raise ModelLoadError(f"bad spec {spec!r}: no model named; {SPEC_HELP}")
        if Path(body).expanduser().is_dir():
            return ModelSpec("hf", path=str(Path(body).expanduser()))
        if body.startswith((".", "/", "~")):
            raise ModelLoadError(f"Hugging Face folder not found: {body} (spec {spec!r})")
        return ModelSpec("hf", hf_id=body)
    if Path(text).expanduser().is_dir():
        return ModelSpec("hf", path=str(Path(text).expanduser()))
    raise ModelLoadError(f"unknown model spec {spec!r}; {SPEC_HELP}")
