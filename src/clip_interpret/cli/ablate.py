"""``ablate``: one command, two jobs on a run's heads.

* ``ablate RUN``: the mean-ablation study (the paper's: zero-shot accuracy with the MLPs, then the attention
  of layers 0..k, replaced by their mean, from the stored pieces; ``study.step_ablate``), locally or on Ray;
* ``ablate RUN --heads L10.H3,... [--property P]``: interventions on chosen heads, MLPs or attention layers,
  their direct and total effects (the model re-run on the run's images; ``effects.intervention_study``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ClipInterpretError
from .common import add_compute_options, add_engine_options, engine, run_and_model

DESCRIPTION = """Two jobs on a run's heads:

  ablate RUN                      the mean-ablation study: zero-shot accuracy with the MLPs, then the
                                  attention of layers 0..k, replaced by their mean over the run's images,
                                  from its stored pieces (RUN/ablation.json); locally or with --engine ray
  ablate RUN --heads L10.H3,...   interventions: the direct and total effects of ablating chosen heads, MLPs
  ablate RUN --property P         or attention layers (or the heads labelled P), the model re-run on the
                                  run's images (RUN/intervention-TARGETS.json); here only, not on Ray

The study's `full` row sums the stored pieces, the interventions' `unmodified` row re-runs the model
(docs/hooks.md)."""


def cmd_ablate(args) -> int:
    if args.heads or args.property:
        if args.engine != "local":
            raise ClipInterpretError("--engine ray runs the mean-ablation study (without --heads/--property); "
                                     "interventions re-run the model here: drop --engine ray")
        return _interventions(args)
    if args.groups or args.probe:
        raise ClipInterpretError("--groups and --probe need targets: --heads L10.H3,... or --property P")
    return _mean_ablation(args)


def _mean_ablation(args) -> int:
    """The mean-ablation study of the run (every analysed layer's attention and MLPs)."""
    from ..ablation import format_table
    from ..study import step_ablate

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


def _interventions(args) -> int:
    """Direct and total effects of ablating chosen heads / MLPs / attention layers."""
    from ..effects import format_study, intervention_study, intervention_targets, save_intervention
    from ..runstore import open_run

    if args.batch_size < 1 or (args.mean_images is not None and args.mean_images < 1):
        raise ClipInterpretError("--batch-size and --mean-images must be at least 1")
    run = open_run(args.run)
    targets = intervention_targets(run, args.heads, args.property, args.labels)
    probe = open_run(args.probe) if args.probe else None
    run, model = run_and_model(args.run, args)
    result = intervention_study(run, model, targets, args.mode, groups=args.groups, probe=probe,
                                batch_size=args.batch_size, workers=args.workers, mean_images=args.mean_images)
    print(format_study(result))
    print(unmodified_row_note(run, model))
    print(f"\nwrote {save_intervention(run, result, targets)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("ablate", help="mean-ablation study (ablate RUN); with --heads/--property, interventions: "
                                      "the direct and total effects of ablating chosen heads, MLPs or attention layers",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--workers", type=int, default=None,
                   help="interventions: image-reading processes (default: the cores); the study with --engine ray: "
                        "Ray workers, tasks at once (default: as many as the cluster fits)")
    add_compute_options(p)
    study = p.add_argument_group("the mean-ablation study (ablate RUN)")
    add_engine_options(study)
    chosen = p.add_argument_group("interventions (ablate RUN --heads TARGETS and/or --property P)")
    chosen.add_argument("--heads", default=None, help="targets: heads L10.H3, MLPs MLP10, attention layers ATTN10, "
                                                      "comma-separated (re-runs the model on the run's images)")
    chosen.add_argument("--property", default=None, help="also target the heads labelled with this property")
    chosen.add_argument("--labels", default=None, help="labels for --property: a labels file or a run folder "
                                                       "(default RUN/labels.json)")
    chosen.add_argument("--mode", choices=["mean", "zero"], default="mean",
                        help="what replaces the targets: their mean over the run's images (per token), or zero")
    chosen.add_argument("--mean-images", type=int, default=None, help="average over the first N images only")
    chosen.add_argument("--groups", default=None, help="a label set of the run: accuracy per group, worst group")
    chosen.add_argument("--probe", default=None, metavar="RUN",
                        help="classify with linear probes fitted on this run's embeddings (same intervention) "
                             "instead of zero-shot")
    chosen.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_ablate)
