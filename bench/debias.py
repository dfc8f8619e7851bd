"""Locate-Then-Correct on the toy world's biased collection, with a known answer, over several seeds.

Per seed: a biased training collection (the cue agrees with the class in --agree-train of the images; the
linear probes are fitted on it), a biased validation collection (--agree-val; the heads are located and k
chosen there) and a balanced test collection (--n-test). ``clip_interpret.debias`` locates the spurious
heads by contrast and corrects them; reported on the test collection: worst-group and average accuracy
(probe and zero-shot) before and after, beside as many random heads (--random draws), and the precision
and recall of the located heads against a reference set defined apart from the locating score: the heads
whose mean-ablation, alone, lowers the cue's zero-shot margin on the test images (mean over images of
<e, t_true cue> - <e, t_other cue>, e the unit embedding) by at least --ref-drop of its unmodified value.

    python bench/debias.py                    # toy model, class shape, cue background, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from spurious import interval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--agree-train", type=float, default=1.0)
    parser.add_argument("--agree-val", type=float, default=0.95)
    parser.add_argument("--core", default="shape")
    parser.add_argument("--cue", default="background")
    parser.add_argument("--random", type=int, default=5)
    parser.add_argument("--ref-drop", type=float, default=0.02)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from clip_interpret import load_model
    from clip_interpret.debias import Variant, corrected_embeddings, debias
    from clip_interpret.runstore import index_images
    from clip_interpret.toyworld import spurious
    from clip_interpret.zeroshot import zero_shot_tasks

    model = load_model(args.model)
    began = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in range(args.seeds):
            runs = {}
            for split, n, agree in (("train", args.n_train, args.agree_train), ("val", args.n_val, args.agree_val),
                                    ("test", args.n_test, 0.5)):
                folder = tmp / f"{split}{k}"
                spurious(folder, n, 300 + 3 * k + ("train", "val", "test").index(split), agree, core=args.core,
                         cue=args.cue, progress=False)
                runs[split] = index_images(model, str(folder / "spurious.csv"), tmp / f"run-{split}{k}",
                                           layers="all", progress=False)
            result = debias(runs["test"], model, args.core, args.cue, probe=runs["train"], val=runs["val"],
                            n_random=args.random, seed=k)
            # the reference set: single-head mean-ablation's effect on the cue margin (test images)
            test = runs["test"]
            cue = {t.name: t for t in zero_shot_tasks(test, model)}[args.cue]
            names = test.head_names()
            lo, hi = test.layout["heads"]
            total = sum(np.asarray(p[:, lo:hi], np.float64).sum(0) for _, p in test.iter_pieces())
            mean = total / len(test)
            variants = {"none": Variant()} | {h: Variant([i]) for i, h in enumerate(names)}
            emb = corrected_embeddings(test, variants, mean, np.zeros((test.dim, 0)))
            t = cue.classes
            sign = np.where(cue.labels == 1, 1.0, -1.0)

            def margin(e):
                return float(np.mean(sign * (e @ (t[1] - t[0]))))

            base = margin(emb["none"])
            drop = {h: (base - margin(emb[h])) / base for h in names}
            reference = {h for h in names if drop[h] >= args.ref_drop}
            located = set(result["located"])
            hit = len(located & reference)
            precision = hit / len(located) if located else float("nan")
            recall = hit / len(reference) if reference else float("nan")
            acc = result["accuracy"]
            row = {"seed": k, "located": result["located"], "chosen_by": result["chosen_by"],
                   "reference": sorted(reference), "precision": precision, "recall": recall,
                   "accuracy": {clf: {v: {"worst": acc[clf][v]["worst_group_accuracy"],
                                          "average": acc[clf][v]["average_accuracy"]}
                                      for v in ("unmodified", "projection", "located", "debiased", "random",
                                                "random+projection")} for clf in acc},
                   "cue_decodable": result["spurious_zero_shot_accuracy"]}
            rows.append(row)
            p = row["accuracy"]["probe"]
            z = row["accuracy"]["zero-shot"]
            print(f"seed {k}: {len(located)} heads located ({result['chosen_by'].split(' chosen')[0]}), reference "
                  f"{len(reference)}, precision {precision:.2f}, recall {recall:.2f}; probe worst group: unmodified "
                  f"{p['unmodified']['worst']:.1%}, debiased {p['debiased']['worst']:.1%}, random "
                  f"{p['random+projection']['worst']:.1%}; zero-shot worst: {z['unmodified']['worst']:.1%} -> "
                  f"{z['debiased']['worst']:.1%} (random {z['random+projection']['worst']:.1%}) "
                  f"[{time.time() - began:.0f} s]", flush=True)
    print(f"\nover {args.seeds} seeds (mean [95% t-interval]):")
    for clf in ("probe", "zero-shot"):
        for name, key in (("worst-group gain, debiased", "debiased"), ("worst-group gain, located only", "located"),
                          ("worst-group gain, random heads (+projection)", "random+projection")):
            gains = [100 * (r["accuracy"][clf][key]["worst"] - r["accuracy"][clf]["unmodified"]["worst"]) for r in rows]
            m, lo_, hi_ = interval(gains)
            print(f"  {clf:<9} {name:<46} {m:+6.1f} [{lo_:+.1f}, {hi_:+.1f}] points")
        diff = [100 * (r["accuracy"][clf]["debiased"]["worst"] - r["accuracy"][clf]["random+projection"]["worst"])
                for r in rows]
        m, lo_, hi_ = interval(diff)
        print(f"  {clf:<9} {'debiased minus random heads':<46} {m:+6.1f} [{lo_:+.1f}, {hi_:+.1f}] points")
    for name in ("precision", "recall"):
        m, lo_, hi_ = interval([r[name] for r in rows])
        print(f"  located heads vs reference: {name} {m:.2f} [{lo_:.2f}, {hi_:.2f}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seeds": rows}, indent=1))


if __name__ == "__main__":
    main()
