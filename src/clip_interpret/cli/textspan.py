"""``textspan``: TextSpan, a text basis for each analysed head of a run."""

from __future__ import annotations

from .common import add_compute_options, add_engine_options, engine, run_and_model


def cmd_textspan(args) -> int:
    from ..ablation import format_table
    from ..study import step_textspan
    from ..textspan import format_heads

    where = engine(args)
    run, model = run_and_model(args.run, args)
    result, name, _ = step_textspan(run, model, args.pool, m=args.m, rank=args.rank, check=not args.no_check,
                                    force=True, engine=where)
    print(format_heads(result))
    if result.get("reconstruction") and "accuracy" in result["reconstruction"]:
        print()
        print(format_table(result["reconstruction"], "zero-shot accuracy with the analysed heads replaced by "
                                                     "their TextSpan reconstructions (other layers and MLPs "
                                                     "mean-ablated)"))
    print(f"\nwrote {name}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("textspan", help="TextSpan: a text basis for each analysed head")
    p.add_argument("run", help="run directory")
    p.add_argument("--pool", default="general", help="general, toy, or a text file (default general)")
    p.add_argument("--m", type=int, default=5, help="texts per head (default 5)")
    p.add_argument("--rank", type=int, default=80, help="rank of the head subspace (default 80)")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--no-check", action="store_true", help="skip the reconstruction check")
    add_compute_options(p)
    add_engine_options(p, workers=True)
    p.set_defaults(func=cmd_textspan)
