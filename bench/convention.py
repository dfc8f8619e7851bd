"""Benchmark: how much the published convention changes per-head values, TextSpan picks and
per-head neighbours, on the bundled toy model (CPU).

Indexes the same toy-world images twice (all layers, fp32 storage), once with each convention
(``centred``, ours; ``published``, the original code's), then per head:

* relative difference ``||a - b|| / ||a||`` over all images (a: centred, b: published), raw and
  after centring each head over the images (TextSpan centres a head's contributions first);
* TextSpan on the toy pool (m texts, rank 80): heads whose picks differ (in order, as sets, the
  first pick, the most common property among the picks: what a taxonomy label follows),
  beside chance: the same count between two independent image samples of one convention
  (``--baseline``, by default the next toy-world seed), what sampling alone changes;
* the top-k image neighbours (dot product of the head's contributions, the query excluded) of
  the first q images: mean overlap and heads whose lists differ.

    python bench/convention.py [--images toyworld:2000:1] [--m 5] [--k 8] [--queries 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def neighbours(x: np.ndarray, queries: int, k: int) -> np.ndarray:
    """Top-k rows by dot product with each of the first ``queries`` rows, itself excluded: [q, k]."""
    scores = x[:queries] @ x.T
    scores[np.arange(queries), np.arange(queries)] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="toyworld:2000:1", help="image source (default toyworld:2000:1, "
                                                                    "held out from the toy model's training world 0)")
    parser.add_argument("--baseline", default=None, help="an independent sample for the TextSpan baseline "
                                                         "(default: toyworld with the next seed)")
    parser.add_argument("--m", type=int, default=5, help="TextSpan texts per head (default 5)")
    parser.add_argument("--k", type=int, default=8, help="neighbours per query (default 8, as the analysis)")
    parser.add_argument("--queries", type=int, default=200, help="query images for the neighbours (default 200)")
    parser.add_argument("--out", default=None, help="folder for the two runs (default: a temporary one)")
    args = parser.parse_args()

    from clip_interpret import load_model
    from clip_interpret.runstore import index_images
    from clip_interpret.pools import load_pool
    from clip_interpret.textspan import textspan_run

    baseline = args.baseline
    if baseline is None:
        kind, count, *seed = args.images.split(":")
        if kind != "toyworld":
            parser.error("--baseline is needed when --images is not toyworld:N[:seed]")
        baseline = f"toyworld:{count}:{int(seed[0]) + 1 if seed else 1}"
    model = load_model("toy")
    pool = load_pool("toy")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        runs, spans = {}, {}
        for convention in ("centred", "published"):
            start = time.perf_counter()
            runs[convention] = index_images(model, args.images, out / convention, layers="all", storage="fp32",
                                            convention=convention, progress=False)
            spans[convention] = textspan_run(runs[convention], model, pool, m=args.m, check_ms=None,
                                             progress=False)["heads"]
            print(f"{convention}: indexed and TextSpan in {time.perf_counter() - start:.0f} s")
        other = index_images(model, baseline, out / "baseline", layers="all", storage="fp32", progress=False)
        spans["baseline"] = textspan_run(other, model, pool, m=args.m, check_ms=None, progress=False)["heads"]
        a, b = (runs[c].all_heads() for c in ("centred", "published"))  # [N, L, H, D]
        names = runs["centred"].head_names()
        n = a.shape[0]
        a, b = a.reshape(n, len(names), -1), b.reshape(n, len(names), -1)

    raw = np.linalg.norm(a - b, axis=(0, 2)) / np.linalg.norm(a, axis=(0, 2))
    ac, bc = a - a.mean(0), b - b.mean(0)
    centred = np.linalg.norm(ac - bc, axis=(0, 2)) / np.linalg.norm(ac, axis=(0, 2))

    def majority(categories: list[str]) -> str:
        return max(categories, key=lambda c: (categories.count(c), -categories.index(c)))

    def differ(x: str, y: str) -> tuple[list[str], list[str], list[str], list[str]]:
        """Heads whose picks differ between two TextSpan results: in order, as sets, the first pick,
        the most common property."""
        tx, ty = ({h: spans[k][h]["texts"] for h in names} for k in (x, y))
        cx, cy = ({h: majority(spans[k][h]["categories"]) for h in names} for k in (x, y))
        return ([h for h in names if tx[h] != ty[h]], [h for h in names if set(tx[h]) != set(ty[h])],
                [h for h in names if tx[h][0] != ty[h][0]], [h for h in names if cx[h] != cy[h]])

    ordered, as_sets, first, prop = differ("centred", "published")
    chance = differ("centred", "baseline")
    queries = min(args.queries, n)
    overlaps, changed = [], 0
    for j in range(len(names)):
        na, nb = neighbours(a[:, j], queries, args.k), neighbours(b[:, j], queries, args.k)
        overlaps.append(np.mean([len(set(x) & set(y)) / args.k for x, y in zip(na, nb)]))
        changed += int((na != nb).any())

    print(f"\n{args.images}: {n} images, {len(names)} heads (all {len(names) // runs['centred'].n_heads} layers), "
          f"toy model {model.spec}")
    print("per-head relative difference ||centred - published|| / ||centred|| over all images:")
    print(f"  raw:                        median {np.median(raw):.4f}  max {raw.max():.4f} ({names[raw.argmax()]})"
          f"  min {raw.min():.4f}")
    print(f"  centred over images:        median {np.median(centred):.4f}  max {centred.max():.4f} "
          f"({names[centred.argmax()]})  min {centred.min():.4f}")
    print(f"TextSpan (toy pool, {len(pool)} texts, m={args.m}, rank 80): picks differ in {len(ordered)}/{len(names)} "
          f"heads in order, {len(as_sets)}/{len(names)} as sets, first pick in {len(first)}/{len(names)} "
          f"({', '.join(first) or '-'}), most common property in {len(prop)}/{len(names)} ({', '.join(prop) or '-'})")
    print(f"  chance (centred on {args.images} vs centred on {baseline}): {len(chance[0])}/{len(names)} in order, "
          f"{len(chance[1])}/{len(names)} as sets, first pick in {len(chance[2])}/{len(names)}, most common "
          f"property in {len(chance[3])}/{len(names)}")
    for h in as_sets[:10]:
        print(f"  {h}: centred {spans['centred'][h]['texts']}\n  {' ' * len(h)}  published {spans['published'][h]['texts']}")
    print(f"top-{args.k} neighbours of {queries} images per head: mean overlap {np.mean(overlaps):.4f} "
          f"(min {np.min(overlaps):.4f}, {names[int(np.argmin(overlaps))]}); lists differ in {changed}/{len(names)} "
          "heads")


if __name__ == "__main__":
    main()
