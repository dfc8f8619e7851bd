"""``debias``: spurious heads located by contrast and corrected (Locate-Then-Correct; ``clip_interpret.debias``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipInterpretError
from .common import add_compute_options, run_and_model


def cmd_debias(args) -> int:
    from ..debias import debias, format_debias
    from ..labels import head_labels, heads_with_property
    from ..runstore import open_run
    from ..runstore.store import atomic_write_json

    if args.k is not None and args.threshold is not None:
        raise ClipInterpretError("give --k or --threshold, not both")
    probe = open_run(args.probe) if args.probe else None
    val = open_run(args.val) if args.val else None
    labelled = None
    if args.labels:
        labelled = heads_with_property(head_labels(Path(args.labels)), args.spurious)
        if not labelled:
            raise ClipInterpretError(f"no head is labelled {args.spurious!r} in {args.labels}; drop --labels or "
                                     "label the heads (clip-interpret label)")
    run, model = run_and_model(args.run, args)
    result = debias(run, model, args.class_column, args.spurious, k=args.k, threshold=args.threshold, probe=probe,
                    val=val, labelled=labelled, n_random=args.random, seed=args.seed, max_k=args.max_k,
                    val_fraction=args.val_fraction)
    print(format_debias(result))
    name = Path(args.out) if args.out else Path(args.run) / f"debias-{args.class_column}-{args.spurious}.json"
    atomic_write_json(name, result)
    print(f"\nwrote {name}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("debias", help="locate the heads that carry a spurious attribute (by contrast with the class), "
                                      "mean-ablate them, project the cue off the class heads; worst-group accuracy")
    p.add_argument("run", help="run directory (the evaluated, test, images)")
    p.add_argument("--class", dest="class_column", required=True, help="the label column of the class")
    p.add_argument("--spurious", required=True, help="the label column of the spurious attribute")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--k", type=int, default=None, help="locate the k heads of highest score")
    pick.add_argument("--threshold", type=float, default=None,
                      help="locate every head whose score (spurious minus class accuracy) is at least this")
    p.add_argument("--max-k", type=int, default=24, help="without --k/--threshold: k is chosen in 0..MAX_K on the "
                                                         "locating split (default 24)")
    p.add_argument("--probe", default=None, metavar="RUN", help="also classify with linear probes fitted on this "
                                                                "run (same correction); it is the locating split "
                                                                "unless --val is given")
    p.add_argument("--val", default=None, metavar="RUN", help="locate the heads on this run (default: the probe run, "
                                                              "else a held-out part of RUN that is not reported)")
    p.add_argument("--val-fraction", type=float, default=0.5, help="without --val/--probe: the share of RUN held "
                                                                   "out to locate on (default 0.5)")
    p.add_argument("--labels", default=None, help="compare with the heads labelled with the spurious property here "
                                                  "(a labels file or a run folder)")
    p.add_argument("--random", type=int, default=5, help="random head sets of the same number (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random heads and of the held-out split")
    p.add_argument("--out", default=None, help="JSON file (default RUN/debias-CLASS-SPURIOUS.json)")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    add_compute_options(p)
    p.set_defaults(func=cmd_debias)
