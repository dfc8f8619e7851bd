"""Label a run's heads: pick the TextSpan result, run a labeller, apply manual labels, write the files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import ClipInterpretError
from ..runstore.store import read_run_manifest
from .store import LABELS_FILE

LABELLERS = ("taxonomy", "embedding", "llm")


def find_textspan(run_dir: str | Path, textspan: str | None = None) -> Path:
    """The TextSpan result to label: the file given, else the run's only ``textspan-*.json``."""
    run_dir = Path(run_dir)
    if textspan:
        path = Path(textspan)
        for candidate in (path, run_dir / path, run_dir / f"textspan-{textspan}.json"):
            if candidate.is_file():
                return candidate
        raise ClipInterpretError(f"TextSpan result {textspan!r} not found in {run_dir}")
    found = sorted(run_dir.glob("textspan-*.json"))
    if not found:
        raise ClipInterpretError(f"run {run_dir} has no TextSpan results; run `clip-interpret textspan {run_dir} "
                                 "--pool general` (or --pool toy, or your pool file) first")
    if len(found) > 1:
        raise ClipInterpretError(f"run {run_dir} has several TextSpan results ({', '.join(p.name for p in found)}); "
                                 "choose one with --textspan")
    return found[0]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _previous_successes(run_dir: Path, labeller: str) -> dict[str, dict]:
    """The heads the labeller labelled without error in its last file in this run (``{}`` when none)."""
    path = run_dir / f"labels-{labeller}.json"
    try:
        heads = json.loads(path.read_text(encoding="utf-8")).get("heads")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(heads, dict):
        return {}
    return {h: e for h, e in heads.items() if isinstance(e, dict) and not e.get("error")
            and e.get("source") == labeller and isinstance(e.get("texts"), list)}


def merge_with_previous(heads: dict[str, dict], previous: dict[str, dict]) -> dict[str, str]:
    """Keep, per head, an earlier success where this attempt failed (same head, same TextSpan texts):
    a failure never replaces a label that was had. Changes ``heads``; returns ``{head: this attempt's
    error}`` for the heads that kept their earlier entry."""
    kept = {}
    for name, entry in heads.items():
        old = previous.get(name)
        if entry.get("error") and old is not None and old["texts"] == entry.get("texts"):
            kept[name] = entry["error"]
            heads[name] = {**old, "kept": f"this attempt failed ({entry['error']}); the earlier answer is kept"}
    return kept


def label_run(run_dir: str | Path, labeller: str = "taxonomy", textspan: str | None = None, model=None,
              manual: str | None = None, encoder: str = "model", vocabulary: str | None = None, llm=None,
              progress: bool = True, write: bool = True) -> dict:
    """Label every analysed head of a run; writes ``labels-<labeller>.json`` and ``labels.json``.

    ``encoder``/``vocabulary`` are the embedding labeller's (vocabulary default: ``toy`` on a
    toy-world run, else ``general``); ``llm`` is an ``LLMConfig`` for the llm labeller.

    A head that fails now but was labelled by the same labeller before (its last
    ``labels-<labeller>.json`` in the run, same TextSpan texts) keeps that label: merged per head,
    listed under ``"kept"``. When every head failed, ``labels.json`` is left as it was
    (``"labels_json_kept": True``).
    """
    from . import labellers

    if labeller not in LABELLERS:
        raise ClipInterpretError(f"unknown labeller {labeller!r}; choose {', '.join(LABELLERS)}")
    run_dir = Path(run_dir)
    path = find_textspan(run_dir, textspan)
    result = json.loads(path.read_text())
    manifest = read_run_manifest(run_dir)
    options: dict = {}
    kept: dict[str, str] = {}
    if labeller == "taxonomy":
        heads = labellers.taxonomy_labels(result)
    elif labeller == "embedding":
        vocabulary = vocabulary or ("toy" if manifest.source_kind == "toyworld" else "general")
        vocab = labellers.load_vocabulary(vocabulary)
        heads = labellers.embedding_labels(result, vocab, labellers.text_encoder(encoder, model))
        options = {"encoder": encoder, "vocabulary": vocabulary, "properties": vocab.properties}
    else:
        from .llm import LLMConfig, llm_labels

        config = llm or LLMConfig.from_env()
        heads = llm_labels(result, config, progress=progress)
        kept = merge_with_previous(heads, _previous_successes(run_dir, labeller))
        options = {"url": config.url, "model": config.model, "properties": config.properties,
                   "examples": config.examples or "published labels + general pool"}
    head_names = list(result["heads"])
    if manual:
        categories = {h: e.get("categories") for h, e in result["heads"].items()}
        heads = labellers.apply_manual(heads, labellers.read_manual(manual, head_names), categories)
        options["manual"] = str(manual)
    for name, entry in heads.items():
        entry.setdefault("explained", result["heads"][name]["explained"])
    out = {"labeller": labeller, "options": options, "textspan": path.name,
           "stamp": {"textspan_hash": file_hash(path), "fingerprint": result["run"]["fingerprint"],
                     "manual_hash": file_hash(Path(manual)) if manual else None},
           "pool": result["pool"], "heads": heads,
           "failed": {h: e["error"] for h, e in heads.items() if e.get("error")}, "kept": kept}
    if write:
        from ..runstore.store import atomic_write_json

        atomic_write_json(run_dir / f"labels-{labeller}.json", out)
        if heads and len(out["failed"]) == len(heads) and (run_dir / LABELS_FILE).is_file():
            out["labels_json_kept"] = True  # a run that labelled nothing does not replace the labels in force
        else:
            atomic_write_json(run_dir / LABELS_FILE, out)
    return out


def format_labels(result: dict, width: int = 60) -> str:
    lines = [f"labels by {result['labeller']} from {result['textspan']} (pool {result['pool']['name']})"]
    for name, entry in result["heads"].items():
        if entry.get("error"):
            lines.append(f"  {name:<7} FAILED: {entry['error']}")
            continue
        label = entry["label"] or "-"
        marks = "".join("+" if j else "." for j in (entry.get("judgements") or []))
        extra = " (manual)" if entry.get("source") == "manual" else " (kept: this attempt failed)" \
            if entry.get("kept") else ""
        lines.append(f"  {name:<7} {label:<14} {entry['confidence']:>5.0%} {marks:<6} "
                     f"{'; '.join(entry['texts'])[:width]}{extra}")
    return "\n".join(lines)
