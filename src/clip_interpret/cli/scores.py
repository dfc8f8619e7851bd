"""Scoring runs: ``metrics`` (association and entanglement scores, runs compared: table and bar chart) and
``report`` (one self-contained HTML page of a run)."""

from __future__ import annotations

import argparse

from .common import add_compute_options, add_llm_options, llm_config, run_and_model


def cmd_metrics(args) -> int:
    from ..faithfulness import format_share
    from ..metrics import format_comparison
    from ..study import compare_runs

    llm = llm_config(args) if args.llm_url else None
    compared = compare_runs(args.runs, published=args.published, llm=llm, out=args.out)
    print(format_comparison(compared["rows"]))
    for result in compared["results"]:
        for labeller, faith in (result["faithfulness"] or {}).items():
            print(f"{result['run']} ({labeller}): {format_share(faith)}")
    print(f"\nwrote {compared['chart']} and {compared['table']}")
    return 0


def cmd_report(args) -> int:
    from ..report import write_report

    run, model = run_and_model(args.run, args)
    path = write_report(run, model, args.out, n_images=args.images)
    print(f"wrote {path} (self-contained; open it in a browser)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("metrics", help="association and entanglement scores; compare runs (table + bar chart)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories with labels")
    p.add_argument("--published", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the paper's six models from their published labels (default on)")
    p.add_argument("--out", default=None, help="folder for the comparison chart and JSON (default: the first run)")
    add_llm_options(p)  # with --llm-url, the LLM judges the association of the other labellers' labels
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("report", help="write one self-contained HTML report of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="HTML file (default RUN/report.html)")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--images", type=int, default=3, help="sample images with heat maps (default 3)")
    add_compute_options(p)
    p.set_defaults(func=cmd_report)
