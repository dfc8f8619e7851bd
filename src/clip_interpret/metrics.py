"""Interpretability scores of a model from its head labels (definitions and reasons in docs/study.md).

With L the labelled heads, p(h) the property of head h, P the number of candidate
properties, and J_h the judgements of h's TextSpan descriptions by a judge
independent of the labeller (1 when a description is about p(h)):

    association  = (1/|L_J|) * sum_{h in L_J} mean(J_h)       (L_J: labelled heads the judge judged)
    entanglement = |{h in L : exists h' in L, h' != h, p(h') = p(h)}| / |L|
    floor        = 0 if |L| <= P else 1 - (P - 1) / |L|        (the least entanglement P properties allow)
    chance       = 1 - (1 - 1/P)^(|L| - 1)                      (expected entanglement of uniform random labels)
    normalised   = (entanglement - floor) / (chance - floor)   (0: as little sharing as possible; 1: as random)

Association is consistency within heads (1: every description of every head is
about its label), never computed from the labeller's own tags (labels/judges.py).
Entanglement is sharing across heads; with few candidate properties its floor is
high, so it is printed with the floor and the normalised form. Heads without a
label (abstentions, failures) are counted: entanglement is over labelled heads
only, so abstaining moves it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .labels.store import normalise_property


def entanglement_floor(n_labelled: int, n_candidates: int) -> float:
    """The least entanglement ``n_labelled`` heads can have with ``n_candidates`` properties:
    at most P - 1 of them can have a property of their own once there are more heads than P."""
    return 0.0 if n_labelled <= n_candidates else 1 - (n_candidates - 1) / n_labelled


def entanglement_chance(n_labelled: int, n_candidates: int) -> float:
    """Expected entanglement when each head's label is drawn uniformly from P properties."""
    return 1 - (1 - 1 / n_candidates) ** (n_labelled - 1)


def scores(heads: dict[str, dict | str | None], n_heads: int | None = None,
           judgements: dict[str, list[bool]] | None = None, judge: str | None = None,
           n_candidates: int | None = None) -> dict:
    """Scores from ``{head: {"label": ...}}`` (or ``{head: label}``).

    ``judgements``: per head, an independent judge's verdict on each description (``judge``
    says which judge, or why there is none); without them the association is ``None``.
    ``n_candidates``: the number of properties the labeller chooses from (default: the
    number it used)."""
    labels, failed = {}, 0
    for head, entry in heads.items():
        label = entry.get("label") if isinstance(entry, dict) else entry
        failed += bool(isinstance(entry, dict) and entry.get("error"))
        if label:
            labels[head] = normalise_property(label)
    judged = [sum(map(bool, j)) / len(j) for h, j in (judgements or {}).items() if h in labels and j]
    counts = Counter(labels.values())
    shared = sum(1 for p in labels.values() if counts[p] > 1)
    n_heads = n_heads if n_heads is not None else len(heads)
    n_labelled = len(labels)
    candidates = max(n_candidates or 0, len(counts))
    entanglement = shared / n_labelled if labels else None
    floor = entanglement_floor(n_labelled, candidates) if labels else None
    chance = entanglement_chance(n_labelled, candidates) if labels else None
    normalised = (entanglement - floor) / (chance - floor) if labels and chance > floor else None
    return {
        "n_heads": n_heads,
        "n_labelled": n_labelled,
        "n_abstained": n_heads - n_labelled,
        "n_failed": failed,
        "n_judged": len(judged),
        "association": sum(judged) / len(judged) if judged else None,
        "association_judge": judge,
        "entanglement": entanglement,
        "entanglement_floor": floor,
        "entanglement_chance": chance,
        "entanglement_normalised": normalised,
        "n_candidates": candidates,
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
        out[spec] = {**scores(model["head_labels"], judge="no descriptions were published"),
                     "source": "published labels (arXiv 2409.06579)"}
    return out


PUBLISHED_NOTE = ("(published labels): scored from the head labels the paper's authors published (arXiv "
                  "2409.06579), not measured here: no association (no descriptions were published), no ablation check")


def is_published(row: dict) -> bool:
    """Whether a score row comes from the paper's published labels rather than a run's own (measured) labels."""
    return str(row.get("source", "")).startswith("published")


def _num(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def format_confirmed(faith: dict | None) -> str:
    """``67% (chance 27%/44%, p=0.001)``: the confirmed share, the shuffled mean / 95th percentile, p."""
    if not faith or faith.get("share_confirmed") is None:
        return "n/a"
    chance = faith["chance"]
    return (f"{faith['share_confirmed']:.0%} (chance {chance['mean']:.0%}/{chance['p95']:.0%}, "
            f"p={chance['p_value']:.2g})")


def format_comparison(rows: dict[str, dict]) -> str:
    """The comparison table: every score beside what chance gives (see the legend it prints)."""
    names = {n: f"{n} (published labels)" if is_published(row) else n for n, row in rows.items()}
    name_width = max([len(n) for n in names.values()] + [5]) + 2
    lines = [f"{'model':<{name_width}}{'association':>12}{'entanglement':>13}{'floor':>7}{'chance':>7}"
             f"{'norm.':>7}{'labelled':>10}{'abstained':>10}{'props':>6}  {'confirmed by ablation':<30}"
             "top properties (heads)"]
    for name, row in rows.items():
        top = ", ".join(f"{p} {len(h)}" for p, h in list(row["property_heads"].items())[:3])
        lines.append(f"{names[name]:<{name_width}}{_num(row['association']):>12}{_num(row['entanglement']):>13}"
                     f"{_num(row['entanglement_floor'], '.2f'):>7}{_num(row['entanglement_chance'], '.2f'):>7}"
                     f"{_num(row['entanglement_normalised'], '.2f'):>7}{row['n_labelled']:>5}/{row['n_heads']:<4}"
                     f"{row['n_abstained']:>10}{row['n_candidates']:>6}  {format_confirmed(row.get('faithfulness')):<30}"
                     f"{top}")
    lines.append("association: share of a head's TextSpan descriptions an independent judge puts under its label "
                 "(n/a: no independent judge). entanglement: share of labelled heads whose property another head "
                 "carries; floor: the least P candidate properties allow; chance: its value for uniformly random "
                 "labels; norm.: (entanglement - floor) / (chance - floor). confirmed: share of testable labels "
                 "confirmed by single-head mean ablation (chance: the same labels shuffled over the heads, mean/95th "
                 "percentile, and the p-value).")
    if any(is_published(row) for row in rows.values()):
        lines.append(PUBLISHED_NOTE + ".")
    judges = {row.get("association_judge") for row in rows.values() if row.get("association_judge")}
    for judge in sorted(judges):
        users = [n for n, r in rows.items() if r.get("association_judge") == judge]
        lines.append(f"association of {', '.join(users) if len(users) <= 2 else f'{len(users)} rows'}: {judge}")
    return "\n".join(lines)


def bar_chart(rows: dict[str, dict], path: str | Path, title: str = "Interpretability scores") -> Path:
    """Grouped bars per model: association, entanglement (its floor marked) and the confirmed share
    (its shuffled-label chance mean and 95th percentile marked). PNG."""
    from .viz import pyplot

    plt = pyplot()
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(names) + 2), 4.6))
    width = 0.27
    confirmed = [(rows[n].get("faithfulness") or {}).get("share_confirmed") for n in names]
    series = (("association", [rows[n]["association"] for n in names], "#3b7dd8"),
              ("entanglement", [rows[n]["entanglement"] for n in names], "#e07b39"),
              ("confirmed by ablation", confirmed, "#3a9d5d"))
    for k, (label, values, colour) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(names))]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label, color=colour)
        for bar, name in zip(bars, names):
            if is_published(rows[name]):  # scored from the paper's labels, not measured: hatched
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        for bar, value in zip(bars, values):
            if value is None:
                ax.text(bar.get_x() + bar.get_width() / 2, 0.01, "n/a", ha="center", va="bottom", fontsize=7)
    marks = (("entanglement floor", 0, [rows[n]["entanglement_floor"] for n in names], "--", "black"),
             ("confirmed: chance mean", 1, [((rows[n].get("faithfulness") or {}).get("chance") or {}).get("mean")
                                            for n in names], "-", "black"),
             ("confirmed: chance 95th pct", 1, [((rows[n].get("faithfulness") or {}).get("chance") or {}).get("p95")
                                                for n in names], ":", "black"))
    for label, offset, values, style, colour in marks:
        drawn = False
        for i, value in enumerate(values):
            if value is None:
                continue
            x = i + offset * width
            ax.hlines(value, x - width / 2, x + width / 2, colors=colour, linestyles=style, linewidth=1.6,
                      label=None if drawn else label)
            drawn = True
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) + ("\n(published labels)" if is_published(rows[n]) else "") for n in names],
                       rotation=25, ha="right", fontsize=8)
    if any(is_published(rows[n]) for n in names):
        fig.text(0.01, 0.01, "hatched, (published labels): scored from the labels the paper published, not measured "
                 "here", fontsize=7, color="#555555")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.replace("open_clip:", "").replace("/", "\n", 1) if len(name) > 18 else name
