"""The bundled toy CLIP (spec ``toy``): checked against its recorded sha256 and loaded as a local
open_clip checkpoint of the architecture its record names."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelLoadError
from .clip_model import ClipModel
from .files import sha256_file
from .openclip import load_open_clip
from .spec import ModelSpec

TOY_WEIGHTS = Path(__file__).resolve().parent.parent / "toyworld" / "weights"


def load_toy(spec: str) -> ClipModel:
    """The bundled toy CLIP, checked against its recorded checksum, loaded as a local open_clip checkpoint."""
    card = TOY_WEIGHTS / "toy.json"
    weights = TOY_WEIGHTS / "toy.safetensors"
    if not card.is_file() or not weights.is_file():
        raise ModelLoadError(f"the bundled toy model is missing ({weights}); reinstall clip-interpret, or train one "
                             "with `clip-interpret toyworld train` and load it as open_clip:toy@PATH")
    record = json.loads(card.read_text())
    if sha256_file(weights) != record["sha256"]:
        raise ModelLoadError(f"the bundled toy weights {weights} are corrupted (sha256 does not match {card.name}); "
                             "reinstall clip-interpret")
    arch = record.get("config", {}).get("model", "toy")  # the open_clip config it was trained as (toy, toy-v2)
    model = load_open_clip(spec, ModelSpec("open_clip", arch=arch, path=str(weights)))
    model.note = "the bundled toy CLIP trained on the known-answer world (docs/toy-model.md)"
    return model
