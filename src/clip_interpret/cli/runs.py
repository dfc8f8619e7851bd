"""Commands that make and read runs: ``index``, ``ablate`` (mean-ablation study, interventions), ``textspan``."""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipInterpretError
from .common import (IMAGES_HELP, add_compute_options, add_convention_option, add_engine_options, engine, load,
                     pipeline_options, run_and_model, slug)


def cmd_index(args) -> int:
    from ..runstore import index_images

    where = engine(args)
    model = load(args.model, args)
    run = index_images(model, args.images, args.out, layers=args.layers, batch_size=args.batch_size,
                       storage=args.storage, shard_size=args.shard_size, convention=args.convention, engine=where,
                       **pipeline_options(args))
    print(f"indexed {len(run)} images into {args.out} (layers {run.layers}, {run.convention} convention, computed in "
          f"{run.precision} {'on Ray' if where.kind == 'ray' else f'on {model.device}'}, "
          f"stored as {run.storage})")
    for failure in run.failures[:20]:
        print(f"  skipped {failure['source']}: {failure['reason']}")
    if len(run.failures) > 20:
        print(f"  ... and {len(run.failures) - 20} more (listed in {args.out}/shards/*.json)")
    return 0


def cmd_ablate(args) -> int:
    from ..ablation import format_table
    from ..study import step_ablate

    if args.heads or args.property:
        if args.engine != "local":
            raise ClipInterpretError("--engine ray runs the mean-ablation study (without --heads/--property); "
                                     "interventions re-run the model here: drop --engine ray")
        return _ablate_targets(args)
    if args.groups or args.probe:
        raise ClipInterpretError("--groups and --probe need targets: --heads L10.H3,... or --property P")
    where = engine(args)
    run, model = run_and_model(args.run, args)
    result, _ = step_ablate(run, model, force=True, engine=where)
    print(format_table(result, f"zero-shot accuracy, {result['n_images']} images of {args.run}"))
    print(full_row_note(run))
    print(f"\nwrote {Path(args.run) / 'ablation.json'}")
    return 0


def full_row_note(run) -> str:
    """What the mean-ablation table's ``full`` row is, and why it may differ from the interventions' ``unmodified``."""
    note = f"full: the sum of the run's stored pieces ({run.storage} storage"
    if run.storage == "fp16":
        note += ("; their sum is within about 1e-4 of the model's embedding, so an image on a near-tie can score "
                 "differently from `ablate --heads`'s unmodified row, which re-runs the model")
    return note + "; docs/hooks.md)"


def unmodified_row_note(run, model) -> str:
    """What the interventions' ``unmodified`` row is (the model re-run), beside the study's ``full`` row."""
    note = f"unmodified: the model re-run on the run's images in {model.precision}, as the effects are"
    if run.storage == "fp16":
        note += (" (`ablate` without --heads sums the run's fp16-stored pieces instead: an image on a near-tie can "
                 "score differently there)")
    return note + "; docs/hooks.md"


def _ablate_targets(args) -> int:
    """Direct and total effects of ablating chosen heads / MLPs / attention layers (interventions)."""
    from ..effects import format_study, intervention_study
    from ..runstore import open_run
    from ..runstore.store import atomic_write_json
    from ..interventions import Targets
    from ..labels import head_labels, heads_with_property

    if args.batch_size < 1 or (args.mean_images is not None and args.mean_images < 1):
        raise ClipInterpretError("--batch-size and --mean-images must be at least 1")
    run = open_run(args.run)
    spec = args.heads or ""
    if args.property:
        labels = head_labels(Path(args.labels)) if args.labels else head_labels(run.path)
        chosen = heads_with_property(labels, args.property)
        if not chosen:
            raise ClipInterpretError(f"no head is labelled {args.property!r} in "
                                     f"{args.labels or run.path / 'labels.json'}")
        spec = ",".join([p for p in (spec, ",".join(chosen)) if p])
    probe = open_run(args.probe) if args.probe else None
    targets = Targets.parse(spec, run.vit_config())
    run, model = run_and_model(args.run, args)
    result = intervention_study(run, model, targets, args.mode, groups=args.groups, probe=probe,
                                batch_size=args.batch_size, workers=args.workers, mean_images=args.mean_images)
    print(format_study(result))
    print(unmodified_row_note(run, model))
    name = Path(args.run) / f"intervention-{slug(targets.describe(), 60)}.json"
    atomic_write_json(name, result)
    print(f"\nwrote {name}")
    return 0


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
    p = sub.add_parser("index", help="decompose an image collection into a run directory (resumable)")
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--layers", default=None, help="analysed layers (default: last 4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--storage", "--dtype", dest="storage", choices=["fp16", "fp32"], default="fp16",
                   help="storage dtype of the stored pieces (default fp16; --dtype is its old name)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard (default 1024)")
    add_convention_option(p)
    add_compute_options(p, pipeline=True)
    add_engine_options(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("ablate", help="mean-ablation study; with --heads, the direct and total effects of "
                                      "ablating chosen heads, MLPs or attention layers")
    p.add_argument("run", help="run directory")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--heads", default=None, help="targets: heads L10.H3, MLPs MLP10, attention layers ATTN10, "
                                                 "comma-separated (re-runs the model on the run's images)")
    p.add_argument("--property", default=None, help="also target the heads labelled with this property")
    p.add_argument("--labels", default=None, help="labels for --property: a labels file or a run folder "
                                                  "(default RUN/labels.json)")
    p.add_argument("--mode", choices=["mean", "zero"], default="mean",
                   help="what replaces the targets: their mean over the run's images (per token), or zero")
    p.add_argument("--mean-images", type=int, default=None, help="average over the first N images only")
    p.add_argument("--groups", default=None, help="a label set of the run: accuracy per group, worst group")
    p.add_argument("--probe", default=None, metavar="RUN", help="classify with linear probes fitted on this run's "
                                                                "embeddings (same intervention) instead of zero-shot")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="image-reading processes of an intervention (default: the cores); with --engine ray: Ray "
                        "workers, tasks at once (default: as many as the cluster fits)")
    add_compute_options(p)
    add_engine_options(p)
    p.set_defaults(func=cmd_ablate)

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
