"""``toyworld``: export the known-answer world, a spurious-cue collection, train and evaluate the toy CLIP."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ClipInterpretError
from .common import add_compute_options, load


def cmd_toyworld_export(args) -> int:
    from ..toyworld import export

    result = export(args.dir, args.n, seed=args.seed, masks=not args.no_masks)
    print(f"wrote {result['n']} images (world seed {result['seed']}) to {result['dir']}/images, "
          f"attributes.json and attributes.csv" + ("" if args.no_masks else ", masks in masks/"))
    return 0


def cmd_toyworld_spurious(args) -> int:
    from ..toyworld import spurious

    result = spurious(args.dir, args.n, args.seed, args.agree, core=args.core,
                      core_values=args.core_values.split(","), cue=args.cue, cue_values=args.cue_values.split(","))
    print(f"wrote {result['n']} images to {args.dir}/images and {result['table']}; the cue agrees with the class "
          f"in {result['agreeing']} ({result['agreeing'] / result['n']:.0%})")
    return 0


def cmd_toyworld_train(args) -> int:
    from ..device import resolve_device
    from ..pipeline import resolve_workers
    from ..toyworld.evaluate import evaluate, format_eval
    from ..toyworld.train import MODELS, TrainConfig, export_weights, train

    defaults = TrainConfig()
    for name in _TRAIN_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
    if args.model not in MODELS:
        raise ClipInterpretError(f"--model {args.model!r}: choose one of {', '.join(MODELS)}")
    cfg = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      world_seed=args.world_seed, warmup=min(args.warmup, max(1, args.steps // 2)),
                      contrast_group=args.contrast_group, contrast_share=args.contrast_share,
                      contrast_free=args.contrast_free, contrast_n_free=args.contrast_n_free,
                      init=str(Path(args.init).resolve()) if args.init else "", precision=args.precision,
                      probe_weight=args.probe_weight, prompt_weight=args.prompt_weight)
    cfg.check()
    device = resolve_device(args.device)
    # on a CPU the model's threads want the cores; on a GPU the images are the bottleneck
    workers = resolve_workers(args.workers) if device.type != "cpu" else (args.workers or 0)
    result = train(args.out, cfg, checkpoint_every=args.checkpoint_every, device=device, workers=workers)
    out = Path(args.out)
    print(f"trained {result['steps_done']} steps in {result['elapsed_s'] / 60:.1f} min on {device}; "
          f"final loss {sum(result['history'][-20:]) / min(20, len(result['history'])):.3f}")
    weights = out / "toy.safetensors"
    sha = export_weights(result["model"], weights)
    model = load(f"open_clip:{cfg.model}@{weights}", args)
    summary = evaluate(model, n=args.eval_n, workers=args.workers)
    print(format_eval(summary))
    (out / "summary.json").write_text(json.dumps({"config": cfg.to_dict(), "elapsed_s": result["elapsed_s"],
                                                  "device": str(device), "sha256": sha, "eval": summary}, indent=1))
    print(f"\nweights: {weights} (fp16, sha256 {sha[:12]}...); use them as "
          f"--model open_clip:{cfg.model}@{weights}")
    return 0


def cmd_toyworld_eval(args) -> int:
    from ..toyworld.evaluate import (
        diagnose,
        evaluate,
        format_diagnosis,
        format_effects,
        format_eval,
        head_property_effects,
    )

    model = load(args.model, args)
    summary = evaluate(model, n=args.n, seed=args.seed, workers=args.workers)
    print(format_eval(summary))
    if args.heads:
        effects = head_property_effects(model, n=min(args.n, 500), seed=args.seed, workers=args.workers)
        print()
        print(format_effects(effects))
        summary["head_effects"] = {"properties": effects["properties"], "effects": effects["effects"].tolist()}
    if args.diagnose:
        diagnosis = diagnose(model, n_train=args.diagnose, n=args.n, seed=args.seed, workers=args.workers)
        print()
        print(format_diagnosis(diagnosis))
        summary["diagnosis"] = diagnosis
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    return 0


# toyworld train's options whose default is TrainConfig's (filled in when the command runs: its module imports
# torch, which printing the help must not)
_TRAIN_FIELDS = ("model", "steps", "batch_size", "lr", "warmup", "seed", "world_seed", "contrast_group",
                 "contrast_share", "contrast_free", "contrast_n_free", "probe_weight", "prompt_weight")


def register(sub) -> None:
    toy = sub.add_parser("toyworld", help="the known-answer world: export images, train and evaluate the toy CLIP")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="ACTION")
    p = toy_sub.add_parser("export", help="write toy-world PNGs with attributes (JSON, CSV) and object masks")
    p.add_argument("dir", help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="world seed (0 is the training world; 1 is held out)")
    p.add_argument("--no-masks", action="store_true", help="skip the mask PNGs")
    p.set_defaults(func=cmd_toyworld_export)
    p = toy_sub.add_parser("spurious", help="a labelled collection where a cue (background) agrees with the class "
                                            "(shape) in most images: the known-answer Waterbirds")
    p.add_argument("dir", help="output folder")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=10, help="world seed (default 10)")
    p.add_argument("--agree", type=float, default=0.95, help="share of images whose cue agrees with the class "
                                                             "(0.5: balanced)")
    p.add_argument("--core", default="shape", help="the class property (default shape)")
    p.add_argument("--core-values", default="circle,square")
    p.add_argument("--cue", default="background", help="the spurious property (default background)")
    p.add_argument("--cue-values", default="white,black")
    p.set_defaults(func=cmd_toyworld_spurious)
    p = toy_sub.add_parser("train", help="train the toy CLIP on CPU (resumes from OUT/checkpoint.pt)")
    p.add_argument("--out", default="runs/toy-train", help="run folder (default runs/toy-train)")
    p.add_argument("--model", default=None, help="open_clip config: toy (v1: patch 8) or toy-v2 "
                                                           "(patch 16, the bundled model's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (at most half the steps)")
    p.add_argument("--seed", type=int, default=None, help="initialisation seed")
    p.add_argument("--world-seed", type=int, default=None, help="training world seed")
    p.add_argument("--init", default="", metavar="WEIGHTS",
                   help="start from these weights (a .safetensors file or a checkpoint.pt) instead of random ones")
    p.add_argument("--contrast-group", type=int, default=None, metavar="K",
                   help="hard negatives: groups of K images that share every property but one (default 0: none)")
    p.add_argument("--contrast-share", type=float, default=None,
                   help="share of each batch in contrast groups (default 0.5)")
    p.add_argument("--contrast-free", default=None,
                   help="properties a contrast group may leave free (default shape,size,count,position)")
    p.add_argument("--contrast-n-free", type=int, default=None,
                   help="free properties per contrast group (default 1)")
    p.add_argument("--probe-weight", type=float, default=None,
                   help="weight of a per-property linear-probe loss on the image embedding (the probes are "
                        "dropped at export; default 0: none)")
    p.add_argument("--prompt-weight", type=float, default=None,
                   help="weight of a per-property loss of each image against one caption-vocabulary phrase per "
                        "value, through the text tower (default 0: none)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=1000, help="held-out images for the final evaluation")
    p.add_argument("--workers", type=int, default=None,
                   help="processes generating the training images (default: the cores on a GPU, 0 on a CPU, "
                        "where the model's threads need them) and the evaluation images")
    add_compute_options(p)
    p.set_defaults(func=cmd_toyworld_train)
    p = toy_sub.add_parser("eval", help="zero-shot accuracy per property and caption retrieval on held-out images")
    p.add_argument("--model", default="toy", help="model spec (default: the bundled toy model)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1, help="held-out world seed (default 1)")
    p.add_argument("--heads", action="store_true", help="also list the heads with the largest effect per property")
    p.add_argument("--diagnose", type=int, nargs="?", const=3000, default=0, metavar="N_TRAIN",
                   help="also say why each property is or is not learned: a linear probe on the image embeddings "
                        "(fitted on N_TRAIN training-world images, default 3000), the text tower's separation of "
                        "its values, and size's pixel-count baselines")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--workers", type=int, default=None, help="processes generating the images (default: the cores)")
    add_compute_options(p)
    p.set_defaults(func=cmd_toyworld_eval)
    toy.set_defaults(func=lambda args: toy.print_help() or 2)
