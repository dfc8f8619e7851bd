"""``index``: decompose an image collection into a run directory (resumable), the input of every other job."""

from __future__ import annotations

from .common import (IMAGES_HELP, add_compute_options, add_convention_option, add_engine_options, engine, load,
                     pipeline_options)


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
