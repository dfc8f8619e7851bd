"""``faithfulness``: check a run's labels by mean-ablating each head alone."""

from __future__ import annotations

import json

from .common import add_compute_options, add_engine_options, engine, run_and_model


def cmd_faithfulness(args) -> int:
    from ..faithfulness import confident_labels, confirm_labels, format_confirmation
    from ..study import step_faithfulness

    where = engine(args)
    run, model = run_and_model(args.run, args)
    drops, _ = step_faithfulness(run, model, force=True, engine=where)
    print(f"mean-ablating each head alone, {drops['n_images']} images, tasks {', '.join(drops['tasks'])}")
    found = sorted(run.path.glob("labels-*.json"))
    for path in found:
        data = json.loads(path.read_text())
        labels = confident_labels(data["heads"], args.min_confidence)
        below = sum(1 for h, e in data["heads"].items() if e.get("label") and labels[h] is None)
        title = f"labels by {data['labeller']}"
        if args.min_confidence > 0:
            title += f" with confidence >= {args.min_confidence:g} ({below} below it counted as abstentions)"
        if args.verdict != "margin":
            title += f", {args.verdict} verdict"
        print()
        print(format_confirmation(confirm_labels(labels, drops, verdict=args.verdict), title))
    if not found:
        print("no labels in this run yet: the drops are saved; label the heads to check them "
              f"(`clip-interpret label {args.run}`)")
    print(f"\nwrote {run.path / 'faithfulness.json'}")
    return 0


def _confidence(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def register(sub) -> None:
    p = sub.add_parser("faithfulness", help="check the labels by mean-ablating each head alone")
    p.add_argument("run", help="run directory")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--verdict", choices=("margin", "relative"), default="margin",
                   help="margin: the head's most hurt task by margin drop (default); relative: each task's drop "
                        "divided by its mean over the heads (docs/study.md)")
    p.add_argument("--min-confidence", type=_confidence, default=0.0, metavar="C",
                   help="count labels whose confidence is below C (0-1) as abstentions (default 0: every label)")
    add_compute_options(p)
    add_engine_options(p, workers=True)
    p.set_defaults(func=cmd_faithfulness)
