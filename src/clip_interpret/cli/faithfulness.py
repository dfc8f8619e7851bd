"""``faithfulness``: check a run's labels by mean-ablating each head alone."""

from __future__ import annotations

import json

from .common import add_compute_options, add_engine_options, engine, run_and_model


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


def register(sub) -> None:
    p = sub.add_parser("faithfulness", help="check the labels by mean-ablating each head alone")
    p.add_argument("run", help="run directory")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    add_compute_options(p)
    add_engine_options(p, workers=True)
    p.set_defaults(func=cmd_faithfulness)
