"""``label``: name each analysed head's property from its TextSpan descriptions (one labeller, or your own)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ClipInterpretError
from .common import add_compute_options, add_label_options, llm_config, run_and_model


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
    llm = llm_config(args) if labeller == "llm" else None
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


def register(sub) -> None:
    p = sub.add_parser("label", help="label each analysed head with a property from its TextSpan descriptions")
    p.add_argument("run", help="run directory (with TextSpan results)")
    p.add_argument("--textspan", default=None, help="which TextSpan result, if the run has several (file or pool name)")
    p.add_argument("--model", default=None, help="model spec (default: the run's; only the embedding labeller "
                                                 "with --encoder model loads it)")
    add_label_options(p)
    add_compute_options(p)
    p.set_defaults(func=cmd_label)
