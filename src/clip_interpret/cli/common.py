"""What every command shares: the compute and pipeline options, loading a model (and a run's), folders.

Nothing else in the package imports this module; the command modules all do."""

from __future__ import annotations

import re
from pathlib import Path

from ..decompose import DEFAULT_CONVENTION
from ..errors import ClipInterpretError


def add_compute_options(p, pipeline: bool = False) -> None:
    """--device and --precision (every command that loads a model); with ``pipeline``, the
    input pipeline's options too (commands that read many images)."""
    from ..device import DEVICE_HELP, PRECISIONS

    p.add_argument("--device", default="auto", help=f"where the model computes: {DEVICE_HELP} (default auto)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="compute precision of the matrix work (default fp32, exact; bf16/fp16 are faster on a GPU, "
                        "within 1e-2; not the storage dtype of runs)")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER",
                   help="a folder of Hugging Face tokenizer files for the model's text tower (default: the model's "
                        "own tokenizer, from the Hugging Face cache or the Hub)")
    if pipeline:
        p.add_argument("--workers", type=int, default=None,
                       help="image-reading processes (default: the CPU cores available; 0: read in this process); "
                            "with --engine ray: Ray workers, each holding the model once (default: as many as the "
                            "cluster fits)")
        p.add_argument("--decode", choices=["auto", "pil", "torch", "device"], default="auto",
                       help="JPEG decoding: pil (exactly open_clip's transform), torch (torchvision in the workers), "
                            "device (on the GPU); default auto = device on a GPU, torch on the CPU")
        p.add_argument("--draft", action="store_true",
                       help="pil decoding: decode JPEGs at least twice the input size at 1/2, 1/4 or 1/8 scale")


def add_convention_option(p, default: str | None = DEFAULT_CONVENTION) -> None:
    """--convention: how the pieces share the attention output bias and LN_post's mean and bias."""
    from ..decompose import CONVENTIONS

    told = f"default {default}" if default else f"default: an existing run's, else {DEFAULT_CONVENTION}"
    p.add_argument("--convention", choices=list(CONVENTIONS), default=default,
                   help=f"centred (each piece centred by its own mean, b_O and LN_post's bias as pieces of their "
                        f"own) or published (the original code's shares: per-head values as in the paper's tool); "
                        f"{told}; see docs/decomposition.md")


def pipeline_options(args) -> dict:
    return {"workers": args.workers, "decode": args.decode, "draft": args.draft}


def add_engine_options(p, workers: bool = False) -> None:
    """--engine and the Ray options; with ``workers``, also --workers (commands without a pipeline)."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (this process, default) or ray (a Ray cluster; pip install 'clip-interpret[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="ray: the cluster, HOST:PORT, ray://HOST:PORT or auto (default: RAY_ADDRESS, else a local "
                        "Ray started for the command and stopped after)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="ray: GPUs per Ray worker (default 0: CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1,
                   help="ray: CPUs per Ray worker; an indexing worker runs that many image-reading processes "
                        "(default 1)")
    if workers:
        p.add_argument("--workers", type=int, default=None,
                       help="ray: Ray workers, tasks at once (default: as many as the cluster fits)")


def engine(args):
    """The ``engine.Engine`` the engine options name (checked: Ray installed, sane counts)."""
    from ..engine import resolve_engine

    return resolve_engine(args.engine, args.ray_address, args.workers if args.engine == "ray" else None,
                          args.gpus_per_worker, args.cpus_per_worker)


IMAGES_HELP = ("a folder, a text file of image paths, a CSV or Parquet table, tars:PATTERN (WebDataset shards, "
               "e.g. tars:data/{00000..00099}.tar) or toyworld:N[:seed]")


def load(spec, args):
    from ..models import load_model

    return load_model(spec, tokenizer=args.tokenizer, device=args.device, precision=args.precision)


def slug(text: str, limit: int = 40) -> str:
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (text[:limit].rstrip("-")) or "x"


def ensure_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ClipInterpretError(f"cannot write to output folder {out}: {err.strerror or err}") from None


def run_and_model(path: str, args, check=None):
    """Open a run and load its model (the manifest's spec unless --model is given) on --device in
    --precision, checked against the run. ``check(run)`` validates the other arguments first: a
    mistake is reported before the model loads."""
    from ..runstore import open_run

    run = open_run(path)
    if check is not None:
        check(run)
    model = load(args.model or run.model_spec, args)
    run.check_model(model)
    return run, model
