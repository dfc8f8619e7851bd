"""``decompose``: split single images' similarities with texts by layer, head and token (JSON, heat maps)."""

from __future__ import annotations

import json
from pathlib import Path

from ..conventions import DEFAULT_CONVENTION
from ..errors import ClipInterpretError
from .common import add_compute_options, add_convention_option, ensure_dir, load, pipeline_options, slug


def _decompose_report(model, images, texts, layers, spatial, out: Path | None, top: int, skip_bad: bool,
                      heat_heads=None, pipeline: dict | None = None, convention: str = DEFAULT_CONVENTION) -> dict:
    from ..decompose import decompose
    from ..images import load_image

    result = decompose(model, images, layers=layers, spatial=spatial and bool(texts),
                       on_error="skip" if skip_bad else "raise", convention=convention, **(pipeline or {}))
    report = {
        "model": model.spec,
        "random_weights": model.random_weights,
        "layers": result.layers,
        "heads_per_layer": result.n_heads,
        "pool": model.vit.cfg.pool,
        "texts": list(texts),
        "images": [],
        "failures": [{"source": f.source, "reason": f.reason} for f in result.failures],
        "convention": result.convention,  # how the pieces are split; see docs/decomposition.md
        "zero_shot": "sigmoid(logit_scale * similarity + logit_bias), per text" if model.logit_bias is not None
        else "softmax over the given texts of logit_scale * similarity",
        "logit_scale": model.logit_scale,
        "logit_bias": model.logit_bias,
        "device": str(model.device),
        "precision": model.precision,
    }
    text_emb = model.encode_text(texts) if texts else None
    names = result.head_names
    if text_emb is not None:  # once for the whole batch, not per image
        all_scores = result.head_similarity(text_emb).reshape(len(result.sources), -1, len(texts))  # [B, L*H, n]
        all_sims = result.similarity(text_emb)
        zero_shot = model.scores(result.embedding, text_emb)  # the model's own: softmax (CLIP) or sigmoid (SigLIP)
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
                    "zero_shot": float(zero_shot[i, t]),
                    "top_heads": [{"head": names[j], "score": float(scores[j, t])} for j in order],
                    "heads": {names[j]: float(scores[j, t]) for j in range(len(names))},
                    "pieces": pieces,
                }
                entry["texts"].append(item)
        report["images"].append(entry)

    if spatial and texts and out is not None:
        from ..viz import save_heatmap

        maps = result.similarity_maps(text_emb, heads=heat_heads)  # [B, n, H, W]
        for i, source in enumerate(result.sources):
            try:
                shown = model.preprocess.crop(load_image(source))
            except ClipInterpretError:
                shown = None
            if shown is None:
                continue
            for t, text in enumerate(texts):
                name = f"{i:03d}-{slug(Path(source).stem)}--{slug(text)}.png"
                heads_label = "all analysed heads" if heat_heads is None else ", ".join(heat_heads)
                save_heatmap(out / name, shown, maps[i, t].numpy(),
                             title=f"{text!r} ({heads_label}, layers {result.layers})")
                report["images"][i]["texts"][t]["heatmap"] = name
    return report


def _print_report(report: dict, top: int) -> None:
    if report["random_weights"]:
        print("NOTE: this model has RANDOM weights; the numbers below show the mechanics, not meaning.\n")
    print(f"model {report['model']}, analysed layers {report['layers']}, {report['convention']} convention")
    for entry in report["images"]:
        print(f"\n{entry['source']}")
        if "top_heads_by_norm" in entry:
            print("  heads with the largest direct effect (norm of contribution; pass --text for similarities):")
            for row in entry["top_heads_by_norm"]:
                print(f"    {row['head']:<10} {row['norm']:.4f}")
            continue
        for item in entry["texts"]:
            print(f"  text {item['text']!r}: similarity {item['similarity']:+.4f}, zero-shot score "
                  f"{item['zero_shot']:.4f} ({report['zero_shot'].split(' of')[0].split('(')[0]})")
            print(f"    top {top} heads: " + ", ".join(f"{h['head']} {h['score']:+.4f}" for h in item["top_heads"]))
            p = item["pieces"]
            pooled = report["pool"] == "map"
            every_token = report["pool"] in ("map", "attn-pool")  # the pooler reads every token's embedding
            print(f"    pieces: heads {p['heads']:+.4f}  attn bias {p['attn_bias']:+.4f}  "
                  f"other layers' attention {p['other_attn']:+.4f}  MLPs {p['mlps']:+.4f}  "
                  f"{'token embeddings' if every_token else 'CLS embedding'} {p['cls_embed']:+.4f}  "
                  + (f"pooling MLP {p['pool_mlp']:+.4f}  " if pooled else "") + f"constant {p['constant']:+.4f}")
            if "heatmap" in item:
                print(f"    heat map: {item['heatmap']}")
    for failure in report["failures"]:
        print(f"\nskipped {failure['source']}: {failure['reason']}")


def cmd_decompose(args) -> int:
    out = Path(args.out) if args.out else None
    if args.spatial and not args.text:
        raise ClipInterpretError("--spatial draws heat maps of image-text similarity; give at least one --text")
    if out is not None:
        ensure_dir(out)
    model = load(args.model, args)
    heads = args.heads.split(",") if args.heads else None
    report = _decompose_report(model, args.images, args.text or [], args.layers, args.spatial, out, args.top,
                               args.skip_bad, heat_heads=heads, pipeline=pipeline_options(args),
                               convention=args.convention)
    _print_report(report, args.top)
    if out is not None:
        (out / "decomposition.json").write_text(json.dumps(report, indent=1))
        print(f"\nwrote {out / 'decomposition.json'}")
    return 0


def register(sub) -> None:
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
    add_convention_option(p)
    add_compute_options(p, pipeline=True)
    p.set_defaults(func=cmd_decompose)
