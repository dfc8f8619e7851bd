"""The spurious-cue experiment with a known answer (docs/hooks.md), over several seeds.

For each seed: a biased collection (the cue agrees with the class in --agree of the images) on
which linear probes are fitted, and a balanced test collection (--n-test images); the heads the
labeller labels with the cue's property are mean-ablated (direct and total effect) and the
worst-group accuracy on the test collection is compared with the unmodified model's, and with
ablating as many heads drawn at random from the others (--random draws per seed). Prints the
per-group table of the first seed and the gain per seed with its mean and 95% t-interval.

    python bench/spurious.py                                   # toy model, shape vs background, 3 seeds
    python bench/spurious.py --seeds 5 --labels out/demo       # the labels of an existing run
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values) -> tuple[float, float, float]:
    """mean and the 95% t-interval of the mean"""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T975.get(len(values) - 1, 1.96) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--agree", type=float, default=0.95)
    parser.add_argument("--core", default="shape")
    parser.add_argument("--core-values", default="circle,square")
    parser.add_argument("--cue", default="background")
    parser.add_argument("--cue-values", default="white,black")
    parser.add_argument("--labels", default=None, help="a run with labels.json (default: analyze 2,000 held-out "
                                                       "toy-world images, taxonomy labeller, all layers)")
    parser.add_argument("--random", type=int, default=5, help="random head sets per seed")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    args = parser.parse_args()

    from clip_interpret import load_model
    from clip_interpret.effects import intervention_study
    from clip_interpret.runstore import index_images
    from clip_interpret.interventions import Targets
    from clip_interpret.labels import head_labels, heads_with_property
    from clip_interpret.study import analyze
    from clip_interpret.toyworld import spurious

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labels_run = Path(args.labels) if args.labels else tmp / "labels"
        if not args.labels:
            analyze(args.model, "toyworld:2000:1", labels_run, pool="toy", labellers=("taxonomy",), layers="all",
                    progress=False, log=lambda *_: None)
        labels = head_labels(labels_run)
        cue_heads = heads_with_property(labels, args.cue)
        if not cue_heads:
            raise SystemExit(f"no head of {labels_run} is labelled {args.cue!r}")
        cfg = model.vit.cfg
        everyone = [f"L{layer}.H{h}" for layer in range(cfg.layers) for h in range(cfg.heads)]
        others = [h for h in everyone if h not in cue_heads]
        print(f"{len(cue_heads)} heads labelled {args.cue} ({labels_run}): {', '.join(cue_heads)}")
        rows = []
        for k in range(args.seeds):
            runs = {}
            for split, n, agree in (("train", args.n_train, args.agree), ("test", args.n_test, 0.5)):
                folder = tmp / f"{split}{k}"
                spurious(folder, n, 100 + 2 * k + (split == "test"), agree, core=args.core,
                         core_values=args.core_values.split(","), cue=args.cue,
                         cue_values=args.cue_values.split(","), progress=False)
                runs[split] = index_images(model, str(folder / "spurious.csv"), tmp / f"run-{split}{k}",
                                           layers="all", progress=False)

            def study(heads):
                result = intervention_study(runs["test"], model, Targets.parse(heads, cfg), "mean",
                                            groups=args.cue, probe=runs["train"])
                return {v: result["groups"][v][args.core] for v in ("full", "direct", "total")}

            labelled = study(cue_heads)
            rng = np.random.default_rng(k)
            randoms = [study(list(rng.choice(others, size=min(len(cue_heads), len(others)), replace=False)))
                       for _ in range(args.random)]
            rows.append({"seed": k, "labelled": labelled, "random": randoms})
            worst = {v: labelled[v]["worst_group_accuracy"] for v in ("full", "direct", "total")}
            rand = {v: float(np.mean([r[v]["worst_group_accuracy"] for r in randoms])) for v in ("direct", "total")}
            print(f"seed {k}: worst group unmodified {worst['full']:.1%}; cue heads ablated: direct "
                  f"{worst['direct']:.1%}, total {worst['total']:.1%}; random heads: direct {rand['direct']:.1%}, "
                  f"total {rand['total']:.1%}", flush=True)
        first = rows[0]["labelled"]
        print(f"\nper group, seed 0 (class {args.core}, cue {args.cue}; probe fitted on the biased collection):")
        print(f"  {'group':<28}{'unmodified':>12}{'direct':>10}{'total':>10}")
        for group in first["full"]["groups"]:
            print(f"  {group:<28}" + "".join(f"{first[v]['groups'][group]['accuracy']:>{w}.1%}"
                                              for v, w in (("full", 12), ("direct", 10), ("total", 10))))
        print(f"\nworst-group gain over {args.seeds} seeds (points; mean [95% t-interval]):")
        for variant in ("direct", "total"):
            gains = [100 * (r["labelled"][variant]["worst_group_accuracy"] - r["labelled"]["full"]["worst_group_accuracy"])
                     for r in rows]
            random_gains = [100 * (np.mean([x[variant]["worst_group_accuracy"] for x in r["random"]])
                                   - r["labelled"]["full"]["worst_group_accuracy"]) for r in rows]
            m, lo, hi = interval(gains)
            rm, rlo, rhi = interval(random_gains)
            print(f"  {variant:<7} cue heads {m:+.1f} [{lo:+.1f}, {hi:+.1f}]   random heads {rm:+.1f} "
                  f"[{rlo:+.1f}, {rhi:+.1f}]   per seed: " + ", ".join(f"{g:+.1f}" for g in gains))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "cue_heads": cue_heads, "seeds": rows},
                                                  indent=1))


if __name__ == "__main__":
    main()
