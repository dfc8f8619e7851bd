"""``segbench``: the zero-shot segmentation benchmark (clip_interpret.segbench)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ClipInterpretError
from .common import add_compute_options, ensure_dir, load, pipeline_options, slug


def cmd_segbench(args) -> int:
    from ..runstore.store import atomic_write_json
    from ..segbench import format_segbench, open_dataset, segbench

    if args.batch_size < 1:
        raise ClipInterpretError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ClipInterpretError(f"--limit must be at least 1, got {args.limit}")
    open_dataset(args.dataset, args.limit)  # a bad dataset is reported before the model loads
    out = Path(args.out)
    ensure_dir(out)
    model = load(args.model, args)
    if model.random_weights:
        print("NOTE: this model has RANDOM weights; the benchmark shows the mechanics, not localisation.")
    result = segbench(model, args.dataset, layers=args.layers, per_head=args.heads, batch_size=args.batch_size,
                      limit=args.limit, classifier=args.classifier, **pipeline_options(args))
    print(format_segbench(result))
    path = out / f"segbench-{slug(args.model)}-{slug(args.dataset.split(':', 1)[0])}.json"
    atomic_write_json(path, json.loads(json.dumps(result)))
    print(f"\nwrote {path} ({result['seconds']:.0f} s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("segbench", help="zero-shot segmentation benchmark: maps from the decomposition "
                                        "(toy world per property and per head; ImageNet-Segmentation)")
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--dataset", required=True,
                   help="toyworld:N[:seed] (object masks as ground truth) or imagenet-seg:PATH (the benchmark's "
                        "gtsegs_ijcv.mat)")
    p.add_argument("--layers", default="all", help="layers whose per-patch contributions make the maps "
                                                   "(default all, as the published script)")
    p.add_argument("--heads", action="store_true", default=None,
                   help="also score each head's own map (default: on the toy world only)")
    p.add_argument("--no-heads", dest="heads", action="store_false", help="do not score each head")
    p.add_argument("--limit", type=int, default=None, help="imagenet-seg: only the first N images")
    p.add_argument("--classifier", default=None,
                   help="imagenet-seg: a precomputed zero-shot classifier (.npy, [classes, D] or [D, classes]); "
                        "default: ImageNet's 1,000 classes with OpenAI's 80 templates (computed once, cached)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="out/segbench", help="folder for the JSON result (default out/segbench)")
    add_compute_options(p, pipeline=True)
    p.set_defaults(func=cmd_segbench)
