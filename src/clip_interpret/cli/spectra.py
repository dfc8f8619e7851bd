"""``spectra``: every head read from its weights alone (clip_interpret.spectra); no images."""

from __future__ import annotations

from pathlib import Path

from ..errors import ClipInterpretError
from .common import add_compute_options, load

DEFAULT_K = 5  # spectra.DEFAULT_K, here without importing torch
DEFAULT_TEXTS = 5  # spectra.DEFAULT_TEXTS


def cmd_spectra(args) -> int:
    import json

    from ..pools import load_pool
    from ..runstore.store import atomic_write_json
    from ..spectra import format_spectra, head_spectra

    if args.k < 1:
        raise ClipInterpretError(f"--k must be at least 1, got {args.k}")
    if args.texts < 1:
        raise ClipInterpretError(f"--texts must be at least 1, got {args.texts}")
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise ClipInterpretError(f"--out {out}: give a JSON file path in an existing folder")
    run = None
    if args.run is not None:
        from ..runstore import open_run

        run = open_run(args.run)  # a bad run is reported before the model loads
    elif args.model is None:
        raise ClipInterpretError("give a MODEL (e.g. toy), or --run RUN to read the heads of a run's model")
    pool = load_pool(args.pool)  # a bad pool is reported before the model loads
    model = load(args.model or run.model_spec, args)
    if run is not None:
        run.check_model(model)  # the run's report shows these heads beside its labels
    if getattr(model, "random_weights", False):
        print("NOTE: this model has RANDOM weights; the directions show the mechanics, not concepts.")
    result = head_spectra(model, pool=pool, k=args.k, n_texts=args.texts, layers=args.layers,
                          center=args.center)
    print(format_spectra(result))
    print(f"\n{len(result.heads)} heads, {args.k} directions each, pool {pool.name} ({len(pool)} texts): "
          f"{result.seconds:.1f} s")
    data = json.loads(json.dumps(result.to_json()))
    if hasattr(model, "fingerprint"):
        data["fingerprint"] = model.fingerprint()  # the report and the app use a run's file only for its weights
    targets = [out] if out is not None else []
    if run is not None:
        from ..spectra import spectra_file_name

        targets.append(run.path / spectra_file_name(args.pool))
    for target in targets:
        atomic_write_json(target, data)
        print(f"wrote {target}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("spectra", help="read every head from its weights alone (no images): its top singular "
                                       "directions in the joint space, each explained by a few texts, and a label")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="model spec (e.g. toy, open_clip:ViT-B-16:openai); with --run, default the run's model")
    p.add_argument("--pool", default="toy",
                   help="texts that explain the directions: toy, general, or a file (one description a line, "
                        "optionally category<TAB>description; the categories label the heads); default toy")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"directions per head (default {DEFAULT_K})")
    p.add_argument("--texts", type=int, default=DEFAULT_TEXTS,
                   help=f"at most this many texts explain a direction (default {DEFAULT_TEXTS})")
    p.add_argument("--layers", default="all", help="layers, comma-separated, or all (default all)")
    p.add_argument("--no-center", dest="center", action="store_false",
                   help="fit the directions with the texts as they are (default: less the pool's mean text embedding)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the result as JSON")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="also write it into this run folder as spectra-POOL.json (the model must be the run's), "
                        "where `clip-interpret report RUN` and the app's Spectra tab find it")
    add_compute_options(p)
    p.set_defaults(func=cmd_spectra)
