"""Known answer for `spectra` on the bundled toy CLIP: do the labels read from the weights alone agree
with the data-driven ones? And how long does a full `spectra` take?

Needs a study run of the toy model (TextSpan taxonomy labels and the single-head ablations):

    clip-interpret demo --out /tmp/spectra-demo --n 2000
    python bench/spectra.py --run /tmp/spectra-demo [--k 5] [--texts 5] [--no-center] [--timing]

(a) agreement with the TextSpan taxonomy label (labels-taxonomy.json): the share of heads whose two
labels are equal, beside the same spectra labels permuted over the heads (1,000 seeded permutations:
mean, 95th percentile, p-value); (b) the ablation check (faithfulness.json: a label is confirmed when
mean-ablating the head alone hurts that property most), with the faithfulness module's shuffled
baseline, for the spectra labels and, as reference, for the TextSpan labels. ``--timing``: a full
`spectra` (every head, the toy pool) of the toy model and of a random ViT-B-16 (no download).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def agreement(mine: dict, theirs: dict, permutations: int = 1000, seed: int = 0) -> dict:
    heads = sorted(set(mine) & set(theirs))
    a = np.array([str(mine[h]) for h in heads])
    b = np.array([str(theirs[h]) for h in heads])
    observed = float((a == b).mean())
    rng = np.random.default_rng(seed)
    shares = np.array([(a[rng.permutation(len(a))] == b).mean() for _ in range(permutations)])
    return {"heads": len(heads), "share": observed, "chance_mean": float(shares.mean()),
            "chance_p95": float(np.percentile(shares, 95)),
            "p_value": float((1 + (shares >= observed).sum()) / (1 + permutations))}


def timed(spec: str, k: int, texts: int) -> tuple[float, float, int]:
    from clip_interpret import head_spectra, load_model
    from clip_interpret.pools import load_pool, text_embeddings

    model = load_model(spec, device="cpu")
    pool = load_pool("toy")
    start = time.perf_counter()
    emb = text_embeddings(model, pool)
    encode = time.perf_counter() - start
    result = head_spectra(model, pool=pool, k=k, n_texts=texts, text_emb=emb)
    return encode, result.seconds, len(result.heads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a study run of the toy model (clip-interpret demo --out)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--texts", type=int, default=5)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--no-center", dest="center", action="store_false",
                        help="fit with the texts as they are (default: less the pool's mean)")
    parser.add_argument("--timing", action="store_true", help="also time a full spectra of toy and ViT-B-16")
    args = parser.parse_args()

    from clip_interpret import head_spectra, load_model
    from clip_interpret.faithfulness import confirm_labels

    run = Path(args.run)
    textspan = {h: e["label"] for h, e in json.loads((run / "labels-taxonomy.json").read_text())["heads"].items()}
    drops = json.loads((run / "faithfulness.json").read_text())
    model = load_model("toy", device="cpu")
    result = head_spectra(model, pool="toy", k=args.k, n_texts=args.texts, center=args.center)
    mine = result.labels()
    a = agreement(mine, textspan, args.permutations)
    b = confirm_labels(mine, drops, args.permutations)
    ref = confirm_labels(textspan, drops, args.permutations)
    print(f"toy CLIP, pool toy, k={args.k}, at most {args.texts} texts a direction, texts "
          f"{'centred' if args.center else 'as they are'}, {len(mine)} heads")
    print(f"(a) same label as TextSpan (taxonomy): {a['share']:.1%}  | shuffled: mean {a['chance_mean']:.1%}, "
          f"95th pct {a['chance_p95']:.1%}, p = {a['p_value']:.3f}")
    for name, res in (("spectra", b), ("TextSpan (reference)", ref)):
        c = res["chance"]
        print(f"(b) {name}: confirmed by ablation {res['confirmed']}/{res['testable']} = {res['share_confirmed']:.1%}"
              f"  | shuffled: mean {c['mean']:.1%}, 95th pct {c['p95']:.1%}, p = {c['p_value']:.3f}")
    counts = {}
    for label in mine.values():
        counts[label] = counts.get(label, 0) + 1
    print("spectra labels:", dict(sorted(counts.items(), key=lambda kv: -kv[1])))
    if args.timing:
        for spec in ("toy", "open_clip:ViT-B-16"):
            encode, seconds, n = timed(spec, args.k, args.texts)
            print(f"timing {spec}: {n} heads, spectra {seconds:.2f} s (+ {encode:.2f} s encoding the pool's texts, "
                  "cached after the first run)")


if __name__ == "__main__":
    main()
