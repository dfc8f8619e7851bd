"""One self-contained HTML report of a run: opens from disk, no server, no external files.

Sections: model card, mean-ablation table, interpretability scores with their
chart, faithfulness per labeller, the per-head table (TextSpan descriptions,
labels, confidence, judgements, ablation verdict), the heads read from their
weights (a table per head, when the run holds ``spectra-POOL.json``) and heat maps
for a few sample images. Images are embedded as base64 PNG data URLs.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .errors import ClipInterpretError

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222;
line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ddd;padding:.25em .5em;
vertical-align:top}th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17803d;font-weight:600}.bad{color:#b42318;font-weight:600}.muted{color:#777}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em;margin:1em 0}
.maps{display:flex;flex-wrap:wrap;gap:1em}.maps figure{margin:0;max-width:520px}
.maps img{width:100%}figcaption{font-size:.8em;color:#555}h4{margin:1.2em 0 .2em}
"""


def _png(fig_writer) -> str:
    buffer = io.BytesIO()
    fig_writer(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _esc(value) -> str:
    return html.escape(str(value))


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1, numeric_until: int = 999) -> str:
    """An HTML table; cells are HTML already. Columns numeric_from..numeric_until-1 align right."""
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = [f"<td{' class=n' if numeric_from <= i < numeric_until else ''}>{c}</td>" for i, c in enumerate(row)]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _model_card(run, model) -> str:
    rows = [["model spec", _esc(run.model_spec)], ["weights fingerprint", _esc(run.fingerprint)],
            ["image source", _esc(f"{run.source_spec} ({run.source_kind}, {len(run)} images)")],
            ["analysed layers", _esc(", ".join(map(str, run.layers)))],
            ["heads per layer", str(run.n_heads)], ["embedding dimension", str(run.dim)],
            ["storage", _esc(run.storage)]]
    if model is not None:
        rows.append(["note", _esc(model.note or "")])
        if model.random_weights:
            rows.append(["WARNING", "<b>random weights: the figures show the mechanics, not meaning</b>"])
    if run.model_spec == "toy":
        from .models.toy import TOY_WEIGHTS

        card = _read(TOY_WEIGHTS / "toy.json")
        if card and "eval" in card:
            accs = ", ".join(f"{p} {v['accuracy']:.0%}" for p, v in card["eval"]["zero_shot"].items())
            rows.append(["toy model zero-shot (held-out)", _esc(accs)])
    return _table(["", "value"], rows, numeric_from=9)


def _accuracy_table(result: dict) -> str:
    tasks = result["tasks"] + ["mean"]
    rows = [[_esc(v)] + [_pct(row[t]) for t in tasks] for v, row in result["accuracy"].items()]
    rows.append(["chance"] + [_pct(result["chance"].get(t, np.mean(list(result["chance"].values()))))
                              for t in tasks])
    return _table(["variant"] + tasks, rows)


def _ablation(result, textspan) -> str:
    if not result:
        return "<p class=muted>No mean-ablation study in this run (<code>clip-interpret ablate RUN</code>).</p>"
    text = f"<p>Zero-shot accuracy on {result['n_images']} images.</p>" + _accuracy_table(result)
    recon = (textspan or {}).get("reconstruction")
    if recon and "accuracy" in recon:
        text += ("<p>The analysed heads replaced by their TextSpan reconstructions from the first m descriptions "
                 "(other layers' attention and all MLPs mean-ablated):</p>" + _accuracy_table(recon))
    return text


def _metrics_section(metrics, chart: str | None) -> str:
    if not metrics:
        return "<p class=muted>No scores yet (<code>clip-interpret metrics RUN</code>).</p>"
    from .metrics import PUBLISHED_NOTE, format_confirmed, is_published

    def num(value, fmt=".3f"):
        return "n/a" if value is None else format(value, fmt)

    rows = []
    for name, row in metrics["rows"].items():
        top = ", ".join(f"{p} ({len(h)})" for p, h in list(row["property_heads"].items())[:6])
        shown = _esc(name) + (" <span class=muted>(published labels)</span>" if is_published(row) else "")
        rows.append([shown, num(row["association"]), num(row["entanglement"]),
                     num(row.get("entanglement_floor"), ".2f"), num(row.get("entanglement_chance"), ".2f"),
                     num(row.get("entanglement_normalised"), ".2f"), f"{row['n_labelled']}/{row['n_heads']}",
                     str(row.get("n_abstained", row["n_heads"] - row["n_labelled"])),
                     str(row.get("n_candidates", row["n_properties"])), _esc(format_confirmed(row.get("faithfulness"))),
                     _esc(top)])
    text = _table(["model (labeller)", "association", "entanglement", "floor", "chance", "normalised", "labelled",
                   "abstained", "candidate properties", "confirmed by ablation (chance mean/95th pct, p)",
                   "top properties (heads)"], rows, numeric_until=10)
    judges = "".join(f"<li>{_esc(name)}: {_esc(row.get('association_judge') or 'n/a')}</li>"
                     for name, row in metrics["rows"].items())
    text += ("<p class=muted>Association: mean share of a labelled head's TextSpan descriptions that a judge "
             "independent of the labeller puts under its label (n/a: no independent judge, or no published "
             "descriptions). Entanglement: share of labelled heads whose property another head also carries; "
             "floor: the least entanglement the candidate properties allow (1 - (P-1)/labelled heads); chance: its "
             "expected value for uniformly random labels; normalised: (entanglement - floor) / (chance - floor). "
             "Abstained: heads left without a label (entanglement counts labelled heads only). Confirmed: share of "
             "testable labels confirmed by single-head mean ablation, beside the share reached by the same labels "
             "shuffled over the heads (mean, 95th percentile, permutation p-value). Formulas: docs/study.md.</p>"
             f"<p class=muted>Association judged by:</p><ul class=muted>{judges}</ul>")
    if any(is_published(row) for row in metrics["rows"].values()):
        text += f"<p class=muted>{_esc(PUBLISHED_NOTE)}.</p>"
    if chart:
        text += f'<img alt="scores chart" src="{chart}" style="max-width:900px">'
    return text


def _faithfulness_section(faith: dict | None) -> str:
    if not faith:
        return "<p class=muted>No ablation check of the labels (needs a run with zero-shot tasks).</p>"
    rows = []
    for labeller, res in faith.items():
        chance = res.get("chance") or {}
        p_value = chance.get("p_value")
        rows.append([_esc(labeller), str(res["testable"]), str(res["confirmed"]), _pct(res["share_confirmed"]),
                     _pct(chance.get("mean")), _pct(chance.get("p95")), "n/a" if p_value is None else f"{p_value:.3g}",
                     _pct(res["share_confirmed_by_accuracy"])])
    permutations = next(iter(faith.values())).get("chance", {}).get("permutations", "?")
    return ("<p>A label is confirmed when mean-ablating the head lowers the margin of its own property's "
            "zero-shot task more than any other task's (see docs/study.md). Chance: the same labels shuffled over "
            f"the same heads {permutations} times (seeded); p: the share of shuffles that confirm as many labels "
            "or more.</p>"
            + _table(["labeller", "testable labels", "confirmed", "share confirmed", "chance: mean",
                      "chance: 95th percentile", "p-value", "by accuracy drops alone"], rows))


def _heads_table(labels: dict[str, dict], faith: dict | None, textspan: dict | None,
                 judged: dict | None = None) -> str:
    if not textspan:
        return "<p class=muted>No TextSpan results (<code>clip-interpret textspan RUN</code>).</p>"
    names = list(labels)
    header = ["head", "TextSpan descriptions (variance explained)"]
    for name in names:
        header += [f"{name} label", "conf.", "verdict"]
    rows = []
    first_judged = ((judged or {}).get(names[0]) or {}) if names else {}
    for head, ts in textspan["heads"].items():
        judgements = (first_judged.get("judgements") or {}).get(head) or []
        items = []
        for i, (text, share) in enumerate(zip(ts["texts"], ts["explained"])):
            mark = ""
            if i < len(judgements):
                mark = " <span class=ok>&#10003;</span>" if judgements[i] else " <span class=bad>&#10007;</span>"
            items.append(f"{_esc(text)} <span class=muted>({share:.0%})</span>{mark}")
        row = [_esc(head), "<br>".join(items)]
        for name in names:
            entry = labels[name]["heads"].get(head) or {}
            label = entry.get("label")
            if entry.get("error"):
                row += ["<span class=bad>failed</span>", "", _esc(entry["error"])[:200]]
                continue
            verdict = ((faith or {}).get(name) or {}).get("heads", {}).get(head, {}).get("verdict", "")
            css = "ok" if verdict == "confirmed" else "bad" if verdict == "refuted" else "muted"
            shown = _esc(label or "-") + (" <span class=muted>(manual)</span>" if entry.get("source") == "manual"
                                          else "")
            row += [shown, f"{entry.get('confidence', 0):.0%}" if label else "",
                    f"<span class={css}>{_esc(verdict)}</span>"]
        rows.append(row)
    marks = (f"<p class=muted>&#10003;/&#10007;: does the description belong to the {_esc(names[0])} label? "
             f"Judged by {_esc(first_judged.get('detail') or 'no independent judge')}.</p>") if names else ""
    return marks + _table(header, rows, numeric_from=99)


def _spectra_tables(data: dict, run, labels: dict[str, dict]) -> str:
    """One spectra result (``clip-interpret spectra --run``): a table per head of its directions, with the
    label read from the weights beside the run's labels of that head."""
    from .labels.store import normalise_property

    def norm(label):
        return normalise_property(label) if label else None

    pool = data.get("pool") or {}
    heads = data.get("heads") or {}
    text = (f"<p>Pool <b>{_esc(Path(str(pool.get('name', '?'))).name)}</b> ({_esc(pool.get('size', '?'))} texts), "
            f"{_esc(data.get('k', '?'))} directions a head, at most {_esc(data.get('n_texts', '?'))} texts a "
            f"direction, texts {'mean-centred' if data.get('center', True) else 'as they are'}; model "
            f"<code>{_esc(data.get('model', '?'))}</code>.</p>")
    fingerprint = data.get("fingerprint")
    if (fingerprint and fingerprint != run.fingerprint) or (not fingerprint and data.get("model") != run.model_spec):
        text += ("<div class=note>This spectra result was computed from another model than the run's "
                 f"({_esc(data.get('model'))}): its heads are not the run's heads.</div>")
    agreement = []
    for name, entry in labels.items():
        run_labels = {h: norm(e.get("label")) for h, e in (entry.get("heads") or {}).items()
                      if isinstance(e, dict) and e.get("label")}
        both = [h for h, head in heads.items() if h in run_labels and head.get("label")]
        same = sum(norm(heads[h]["label"]) == run_labels[h] for h in both)
        agreement.append(f"{_esc(name)}: {same}/{len(both)}")
    if agreement:
        text += ("<p>Heads whose label from the weights is the run's label (heads labelled by both): "
                 + "; ".join(agreement) + ".</p>")
    for head, entry in heads.items():
        mine = entry.get("label")
        beside = []
        for name, run_entry in labels.items():
            theirs = ((run_entry.get("heads") or {}).get(head) or {}).get("label")
            if theirs:
                mark = (" <span class=ok>&#10003;</span>" if mine and norm(mine) == norm(theirs)
                        else " <span class=bad>&#10007;</span>")
                beside.append(f"{_esc(name)} label: <b>{_esc(theirs)}</b>{mark}")
        confidence = entry.get("confidence")
        shown = (f"<b>{_esc(mine)}</b> ({confidence:.0%})" if mine and isinstance(confidence, (int, float))
                 else f"<b>{_esc(mine)}</b>" if mine else "<span class=muted>none (untagged pool)</span>")
        rows = []
        for j, d in enumerate(entry.get("directions") or []):
            texts = "<br>".join(f"{_esc(t)} <span class=muted>({w:.2f})</span>" if isinstance(w, (int, float))
                                else _esc(t) for t, w in zip(d.get("texts") or [], d.get("weights") or []))
            sign = d.get("sign")
            rows.append([str(j + 1), f"{d['singular']:.4f}" if isinstance(d.get("singular"), (int, float)) else "?",
                         "+" if sign == 1 else "-" if sign == -1 else "?",
                         _pct(d["fit"]) if isinstance(d.get("fit"), (int, float)) else "?",
                         texts or "<span class=muted>-</span>"])
        text += (f"<h4 id=\"spectra-{_esc(head)}\">{_esc(head)}</h4><p>label from the weights: {shown}"
                 + "".join(f"; {b}" for b in beside) + "</p>"
                 + _table(["direction", "singular value", "sign", "fit (share captured)", "texts (weight)"], rows,
                          numeric_until=4))
    return text


def _spectra_section(run, labels: dict[str, dict]) -> str:
    """Every spectra result in the run folder (``spectra-POOL.json``), or how to make one."""
    from .spectra import SPECTRA_GLOB

    files = sorted(run.path.glob(SPECTRA_GLOB))
    if not files:
        return ("<p class=muted>No spectra in this run (<code>clip-interpret spectra --run RUN</code>: every head "
                "read from its weights, no images).</p>")
    parts = ["<p>Each head's top singular directions in the joint space, read from its weights alone (no "
             "images; docs/spectra.md), each explained by a sparse non-negative combination of pool texts. "
             "Fit: the share of the direction (cosine&sup2;) the combination captures; sign: the direction's sign "
             "that was fitted. Singular values are up to LN_post's per-image scale.</p>"]
    for path in files:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("heads"), dict):
                raise ValueError("no heads")
            parts.append(f"<h3>{_esc(path.name)}</h3>" + _spectra_tables(data, run, labels))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            parts.append(f"<p class=bad>{_esc(path.name)} cannot be read ({_esc(type(err).__name__)}: "
                         f"{_esc(err)}); write it again with <code>clip-interpret spectra --run RUN</code>.</p>")
    return "\n".join(parts)


def _heatmaps(run, model, labels: dict | None, textspan: dict | None, n_images: int = 3) -> str:
    """Per sample image: the map of the heads carrying its best-matching labelled property."""
    if model is None or not textspan:
        return "<p class=muted>Heat maps need the model and TextSpan results.</p>"
    from .decompose import decompose
    from .images import load_image
    from .runstore.sources import open_source
    from .viz import save_heatmap

    heads_of: dict[str, list[str]] = {}
    for head, entry in (labels or {}).items():
        if entry.get("label"):
            heads_of.setdefault(entry["label"], []).append(head)
    candidates = []  # (text, heads) pairs: a property's descriptions with that property's heads
    for prop, heads in heads_of.items():
        texts = sorted({t for h in heads for t, j in zip(textspan["heads"][h]["texts"],
                                                         labels[h].get("judgements") or []) if j})
        candidates += [(t, prop, heads) for t in texts[:8]]
    if not candidates:
        candidates = [(t, None, None) for t in sorted({t for h in textspan["heads"].values() for t in h["texts"]})[:24]]
    try:
        source = open_source(run.source_spec)
    except ClipInterpretError as err:
        return f"<p class=muted>Sample images unavailable: {_esc(err)}</p>"
    picks = np.linspace(0, len(run) - 1, num=min(n_images, len(run))).astype(int)
    text_emb = model.encode_text([c[0] for c in candidates])
    figures = []
    for index in picks:
        item = source.load(int(run.source_indices[index]))
        try:
            result = decompose(model, [item], layers=run.layers, spatial=True, convention=run.convention)
        except ClipInterpretError as err:
            figures.append(f"<figure><figcaption>{_esc(run.names[index])}: {_esc(err)}</figcaption></figure>")
            continue
        sims = result.similarity(text_emb)[0]
        best = int(sims.argmax())
        text, prop, heads = candidates[best]
        heat = result.similarity_maps(text_emb[best:best + 1], heads=heads)[0, 0].numpy()
        shown = model.preprocess.crop(load_image(item))
        who = f"heads labelled {prop} ({', '.join(heads)})" if heads else "all analysed heads"
        uri = _png(lambda buf: save_heatmap(buf, shown, heat, title=f"{text!r}: {who}"[:90]))
        figures.append(f'<figure><img alt="heat map" src="{uri}"><figcaption>{_esc(run.names[index])}: '
                       f'{_esc(text)!s} (similarity {float(sims[best]):+.3f}), {_esc(who)}</figcaption></figure>')
    return "<div class=maps>" + "\n".join(figures) + "</div>"


def write_report(run, model, out: str | Path | None = None, n_images: int = 3) -> Path:
    """Write RUN/report.html (or ``out``) from whatever results the run holds."""
    from .labels import LABELS_FILE, read_labels
    from .labels.runs import find_textspan

    root = run.path
    labels = {p.stem[len("labels-"):]: read_labels(root, p.stem[len("labels-"):])
              for p in sorted(root.glob("labels-*.json"))}
    primary = read_labels(root) if (root / LABELS_FILE).is_file() else None
    if primary:  # the labels in force first
        name = primary.get("labeller", "labels.json")
        labels = {name: primary, **{k: v for k, v in labels.items() if k != name}}
    try:
        textspan = _read(root / primary["textspan"]) if primary and primary.get("textspan") else \
            _read(find_textspan(root))
    except ClipInterpretError:
        textspan = None
    metrics = _read(root / "metrics.json")
    chart_path = root / "metrics.png"
    chart = ("data:image/png;base64," + base64.b64encode(chart_path.read_bytes()).decode()) \
        if chart_path.is_file() else None
    faith = (metrics or {}).get("faithfulness")
    notes = []
    if run.random_weights:
        notes.append("This run's model has random weights.")
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>clip-interpret report: {_esc(run.model_spec)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>clip-interpret report</h1><p>{_esc(run.model_spec)} on "
        f"{_esc(run.source_spec)} ({len(run)} images). Run folder: <code>{_esc(root)}</code></p>",
        "".join(f"<div class=note>{_esc(n)}</div>" for n in notes),
        "<h2>Model card</h2>", _model_card(run, model),
        "<h2>Mean-ablation study</h2>", _ablation(_read(root / "ablation.json"), textspan),
        "<h2>Interpretability scores</h2>", _metrics_section(metrics, chart),
        "<h2>Faithfulness of the labels</h2>", _faithfulness_section(faith),
        "<h2>Heads</h2>", _heads_table(labels, faith, textspan, (metrics or {}).get("judgements")),
        "<h2>Heads read from their weights (spectra)</h2>", _spectra_section(run, labels),
        "<h2>Heat maps</h2>", _heatmaps(run, model, (primary or {}).get("heads"), textspan, n_images),
        "<p class=muted>Written by clip-interpret. Pieces and scores follow docs/decomposition.md and "
        "docs/study.md.</p></body></html>",
    ]
    path = Path(out) if out else root / "report.html"
    from .runstore.store import atomic_write_bytes

    payload = "\n".join(parts).encode()
    atomic_write_bytes(path, lambda handle: handle.write(payload))
    return path
