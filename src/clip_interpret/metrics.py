"""Interpretability scores of a model from its head labels (definitions in docs/study.md).

With L the set of labelled heads, p(h) the property of head h, and J_h the
judgements of h's TextSpan descriptions (1 when a description belongs to p(h)):

    association  = (1/|L_J|) * sum_{h in L_J} mean(J_h)       (L_J: labelled heads with judgements)
    entanglement = |{h in L : exists h' in L, h' != h, p(h') = p(h)}| / |L|

Association is consistency within heads (1: every description of every head is
about its label). Entanglement is sharing across heads (0: every property has a
head of its own; 1: no property is carried by a single head alone).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .labels.store import normalise_property


def scores(heads: dict[str, dict | str | None], n_heads: int | None = None) -> dict:
    """Scores from ``{head: {"label": ..., "judgements": [...]}}`` (or ``{head: label}``)."""
    labels, judged = {}, []
    for head, entry in heads.items():
        if isinstance(entry, dict):
            label, judgements = entry.get("label"), entry.get("judgements")
        else:
            label, judgements = entry, None
        if not label:
            continue
        labels[head] = normalise_property(label)
        if judgements:
            judged.append(sum(bool(j) for j in judgements) / len(judgements))
    counts = Counter(labels.values())
    shared = sum(1 for p in labels.values() if counts[p] > 1)
    return {
        "n_heads": n_heads if n_heads is not None else len(heads),
        "n_labelled": len(labels),
        "n_judged": len(judged),
        "association": sum(judged) / len(judged) if judged else None,
        "entanglement": shared / len(labels) if labels else None,
        "n_properties": len(counts),
        "property_heads": {p: sorted(h for h, q in labels.items() if q == p)
                           for p, _ in counts.most_common()},
    }


def published_scores() -> dict[str, dict]:
    """Scores of the paper's six models from the labels their authors published.

    Association needs the heads' descriptions and judgements, which were not
    published, so it is ``None`` there; entanglement and head counts are exact.
    """
    from .labels.llm import published_labels

    out = {}
    for spec, model in published_labels()["models"].items():
        out[spec] = {**scores(model["head_labels"]), "source": "published labels (arXiv 2409.06579)"}
    return out


def format_comparison(rows: dict[str, dict]) -> str:
    name_width = max([len(n) for n in rows] + [5]) + 2
    lines = [f"{'model':<{name_width}}{'association':>12}{'entanglement':>13}{'labelled':>10}{'properties':>11}"
             "  top properties (heads)"]
    for name, row in rows.items():
        assoc = "n/a" if row["association"] is None else f"{row['association']:.3f}"
        ent = "n/a" if row["entanglement"] is None else f"{row['entanglement']:.3f}"
        top = ", ".join(f"{p} {len(h)}" for p, h in list(row["property_heads"].items())[:5])
        lines.append(f"{name:<{name_width}}{assoc:>12}{ent:>13}{row['n_labelled']:>5}/{row['n_heads']:<4}"
                     f"{row['n_properties']:>11}  {top}")
    if any(r["association"] is None for r in rows.values()):
        lines.append("n/a association: no judged descriptions (the published labels come without their TextSpan "
                     "descriptions)")
    return "\n".join(lines)


def bar_chart(rows: dict[str, dict], path: str | Path, title: str = "Interpretability scores") -> Path:
    """Grouped bars of association and entanglement per model (PNG)."""
    from .viz import _pyplot

    plt = _pyplot()
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 4.2))
    width = 0.38
    for offset, key, colour in ((-width / 2, "association", "#3b7dd8"), (width / 2, "entanglement", "#e07b39")):
        values = [rows[n][key] if rows[n][key] is not None else 0.0 for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=key, color=colour)
        for bar, n in zip(bars, names):
            if rows[n][key] is None:
                ax.text(bar.get_x() + bar.get_width() / 2, 0.01, "n/a", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) for n in names], rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.replace("open_clip:", "").replace("/", "\n", 1) if len(name) > 18 else name
