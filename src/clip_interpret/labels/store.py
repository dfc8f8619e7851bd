"""Head labels on disk, and property-name normalisation.

``RUN/labels.json`` holds the labels in force for a run (the last ``label``
command, with manual overrides applied); ``RUN/labels-<labeller>.json`` keeps
each labeller's own result. Both have the same shape::

    {"labeller": "taxonomy", "textspan": "textspan-toy.json", "stamp": {...},
     "heads": {"L5.H3": {"label": "color", "confidence": 0.92,
                          "texts": [...], "judgements": [true, false, ...],
                          "source": "taxonomy" | "manual", "error": null}, ...}}

A head whose labelling failed or that fits no property has ``"label": null``
(and, when it failed, an ``"error"``).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ClipInterpretError
from ..runstore.store import read_json

LABELS_FILE = "labels.json"

# Spelling variants and plain synonyms folded onto one name (after lower-casing and singularising).
SYNONYMS = {
    "colour": "color", "hue": "color",
    "place": "location", "geography": "location",
    "number": "count", "counting": "count", "quantity": "count",
    "form": "shape",
    "bodypart": "body part",
    "profession": "occupation", "job": "occupation",
    "photograph": "photography", "photo": "photography",
    "facial expression": "emotion",
    "backdrop": "background",
    "placement": "position",
}
_IRREGULAR = {"people": "person", "children": "child", "men": "man", "women": "woman", "geese": "goose",
              "mice": "mouse", "teeth": "tooth", "feet": "foot"}
_KEEP_S = ("glass", "class", "grass", "dress", "physics", "graphics", "news", "series", "species", "status",
           "bus", "canvas", "gas", "lens", "chaos", "mathematics", "clothes")


def _singular(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or word.endswith(_KEEP_S) or word.endswith("ss") or word.endswith("us") \
            or word.endswith("is"):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def normalise_property(name: str) -> str:
    """One spelling per property: lower case, singular, synonyms folded (``Colours`` -> ``color``)."""
    text = re.sub(r"[\s_\-/]+", " ", str(name).strip().lower()).strip(" .:;,'\"")
    if not text:
        raise ClipInterpretError("empty property name")
    words = text.split(" ")
    words[-1] = _singular(words[-1])
    text = " ".join(words)
    text = SYNONYMS.get(text, text)
    return SYNONYMS.get(text.replace(" ", ""), text)


def read_labels(run_dir: str | Path, name: str | None = None) -> dict:
    """The labels file of a run (``labels.json``, or ``labels-<name>.json``), parsed; ``run_dir``
    may also be a labels file itself."""
    path = Path(run_dir) if Path(run_dir).is_file() else Path(run_dir) / (LABELS_FILE if name is None
                                                                          else f"labels-{name}.json")
    if not path.is_file():
        raise ClipInterpretError(f"run {run_dir} has no head labels ({path.name}); run "
                                 f"`clip-interpret label {run_dir}` first")
    fix = f"label the run again (`clip-interpret label {run_dir}`)"
    data = read_json(path, fix)
    if not isinstance(data, dict) or not isinstance(data.get("heads"), dict):
        raise ClipInterpretError(f"{path} is not a labels file (no 'heads' mapping); {fix}")
    bad = [head for head, entry in data["heads"].items()
           if not isinstance(entry, dict) or not isinstance(entry.get("label"), (str, type(None)))]
    if bad:
        raise ClipInterpretError(f"{path} has malformed entries for heads {', '.join(bad[:5])}"
                                 f"{' ...' if len(bad) > 5 else ''} (each needs a 'label': a property or null); {fix}")
    return data


def head_labels(run_dir: str | Path, name: str | None = None) -> dict[str, str]:
    """``{head: property}`` for the labelled heads of a run (unlabelled heads left out)."""
    return {head: entry["label"] for head, entry in read_labels(run_dir, name)["heads"].items()
            if entry.get("label")}


def heads_with_property(labels: dict[str, str], prop: str) -> list[str]:
    """Heads whose label is ``prop`` (names compared after normalisation)."""
    want = normalise_property(prop)
    return [head for head, label in labels.items() if normalise_property(label) == want]
