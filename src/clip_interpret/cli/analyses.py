"""Subcommands of the five analyses of a run (one each, writing a PNG and a JSON); the web app that serves
them in the browser is ``app`` (cli/app.py).

``register(sub)`` adds them to the ``clip-interpret`` argparse subparsers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ClipInterpretError, ImageLoadError


def _check_args(args, run) -> None:
    """Check every argument that can be checked without the model (loading one takes seconds):
    k (capped at the analyses' limit), texts, heads, the property, the query image."""
    from .. import analyses

    if hasattr(args, "k"):
        args.k = analyses.check_k(args.k, len(run))
    text = getattr(args, "text", None)
    for item in text if isinstance(text, list) else [] if text is None else [text]:
        analyses.check_text(item)
    if hasattr(args, "heads"):
        analyses.run_heads(run, args.heads)
    if hasattr(args, "property"):
        analyses.property_heads(run, args.property)
    if getattr(args, "run_image", None) is not None:
        analyses.check_index(run, args.run_image)
    elif getattr(args, "image", None) is not None and not Path(args.image).is_file():
        raise ImageLoadError(args.image, "no such file")


def _prepare(args):
    """The run, its model (the manifest's spec unless --model), the output folder, the query image."""
    from .common import ensure_dir, run_and_model

    out = Path(args.out or f"out/{args.command}")

    def check(run):
        _check_args(args, run)
        ensure_dir(out)

    run, model = run_and_model(args.run, args, check=check)
    image = None
    if hasattr(args, "image"):
        image = args.run_image if args.run_image is not None else args.image
    return run, model, out, image


def _write(result, out: Path, stem: str) -> None:
    from .. import analyses
    from .common import slug

    name = slug(stem, 60)
    analyses.render(result, out / f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=1))
    print(f"\nwrote {out / name}.png and {out / name}.json")


def _print_neighbours(result) -> None:
    print(f"{result.analysis} nearest neighbours of {result.query!r} in {result.run}, heads {', '.join(result.heads)}"
          + (f" (property {result.property!r})" if result.property else ""))
    from ..analyses import format_scores

    scores = format_scores(result.scores)
    width = max(len(s) for s in scores) if scores else 0
    for rank, (index, name, score) in enumerate(zip(result.indices, result.names, scores), 1):
        print(f"  {rank:>3}. image {index:<7} {score:<{width}}  {name}")


def _print_maps(result) -> None:
    print(f"{result.analysis} of {result.query!r}, heads: {result.heads_label} (layers {result.layers})")
    for text, share in zip(result.texts, result.shares):
        print(f"  the heads' share of the similarity with {text!r}: {share:+.5f}")
    for title, heat in zip(result.titles, result.maps):
        print(f"  map {title}: min {heat.min():+.5f}, max {heat.max():+.5f} (shared scale ±{result.vmax:.5f})")


def cmd_property_nn(args) -> int:
    from .. import analyses

    run, model, out, image = _prepare(args)
    result = analyses.property_neighbours(model, run, image, args.property, k=args.k, metric=args.metric)
    _print_neighbours(result)
    _write(result, out, f"property-nn-{result.property}")
    return 0


def cmd_image_nn(args) -> int:
    from .. import analyses

    run, model, out, image = _prepare(args)
    result = analyses.image_neighbours(model, run, image, args.heads, k=args.k, metric=args.metric)
    _print_neighbours(result)
    _write(result, out, f"image-nn-{'-'.join(result.heads) if len(result.heads) < 5 else 'heads'}")
    return 0


def cmd_text_nn(args) -> int:
    from .. import analyses

    run, model, out, _ = _prepare(args)
    result = analyses.text_neighbours(model, run, args.text, args.heads, k=args.k)
    _print_neighbours(result)
    _write(result, out, f"text-nn-{args.text}")
    return 0


def cmd_segment(args) -> int:
    from .. import analyses

    run, model, out, image = _prepare(args)
    result = analyses.topic_segmentation(model, image, args.text, args.heads, run=run)
    _print_maps(result)
    _write(result, out, f"segment-{args.text}")
    return 0


def cmd_contrast(args) -> int:
    from .. import analyses

    if len(args.text or []) != 2:
        raise ClipInterpretError("contrast needs exactly two texts: --text A --text B")
    run, model, out, image = _prepare(args)
    result = analyses.contrastive_segmentation(model, image, args.text[0], args.text[1], args.heads, run=run)
    _print_maps(result)
    _write(result, out, f"contrast-{args.text[0]}-vs-{args.text[1]}")
    return 0


def _common(p, image: bool = True) -> None:
    from .common import add_compute_options

    p.add_argument("run", help="run directory (from `clip-interpret index`)")
    if image:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--image", help="query image file")
        group.add_argument("--run-image", type=int, metavar="N", help="use image number N of the run as the query")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--out", default=None, help="output folder for the PNG and JSON (default out/COMMAND)")
    add_compute_options(p)


def register(sub) -> None:
    """Add the analysis subcommands to ``clip-interpret``'s subparsers."""
    from .common import DEFAULT_K, METRICS

    heads_help = "a head (L5.H3), comma-separated heads (summed), or all"

    p = sub.add_parser("property-nn", help="nearest neighbours of an image in the heads labelled with a property")
    _common(p)
    p.add_argument("--property", required=True, help="a head label, e.g. color (see the run's labels.json); the heads labelled "
                                                  "with it are averaged")
    p.add_argument("--k", type=int, default=DEFAULT_K["property"], help=f"neighbours (default {DEFAULT_K['property']})")
    p.add_argument("--metric", choices=METRICS, default="dot", help="dot product (the paper's) or cosine")
    p.set_defaults(func=cmd_property_nn)

    p = sub.add_parser("segment", help="heat map of a text's similarity with heads' per-patch contributions")
    _common(p)
    p.add_argument("--text", required=True, help="the text")
    p.add_argument("--heads", default="all", help=f"{heads_help} (default all)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("contrast", help="contrastive segmentation: maps of text A minus B and B minus A")
    _common(p)
    p.add_argument("--text", action="append", help="give twice: --text A --text B")
    p.add_argument("--heads", default="all", help=f"{heads_help} (default all)")
    p.set_defaults(func=cmd_contrast)

    p = sub.add_parser("image-nn", help="nearest neighbours of an image in one head")
    _common(p)
    p.add_argument("--heads", "--head", required=True, help=heads_help)
    p.add_argument("--k", type=int, default=DEFAULT_K["image"], help=f"neighbours (default {DEFAULT_K['image']})")
    p.add_argument("--metric", choices=METRICS, default="dot", help="dot product (the paper's) or cosine")
    p.set_defaults(func=cmd_image_nn)

    p = sub.add_parser("text-nn", help="the run's images whose contribution in one head best matches a text")
    _common(p, image=False)
    p.add_argument("--text", required=True, help="the text")
    p.add_argument("--heads", "--head", required=True, help=heads_help)
    p.add_argument("--k", type=int, default=DEFAULT_K["text"], help=f"neighbours (default {DEFAULT_K['text']})")
    p.set_defaults(func=cmd_text_nn)
