"""Figures for the toy model card (docs/toy-model.md), printed as Markdown.

Evaluates the bundled toy model (or --model SPEC): zero-shot accuracy per property
and retrieval on held-out images, the diagnosis (linear probe and text separation per
property, `toyworld eval --diagnose`), the heads x properties table of direct effects,
then indexes held-out images and runs the mean-ablation study and TextSpan with the
toy pool (with the reconstruction check).

    python bench/toy_card.py [--model toy] [--n 1000] [--index 2000] [--diagnose 3000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--index", type=int, default=2000)
    parser.add_argument("--diagnose", type=int, default=3000, help="training-world images for the linear probe")
    args = parser.parse_args()

    from clip_interpret import load_model
    from clip_interpret.ablation import ablation_study, format_table
    from clip_interpret.runstore import index_images
    from clip_interpret.pools import load_pool
    from clip_interpret.textspan import textspan_run
    from clip_interpret.toyworld.evaluate import (
        diagnose,
        evaluate,
        format_diagnosis,
        format_eval,
        head_property_effects,
    )

    model = load_model(args.model)
    print("## Zero-shot accuracy and retrieval\n\n```")
    print(format_eval(evaluate(model, n=args.n)))
    print("```\n\n## Diagnosis: linear probe and text separation per property\n\n```")
    print(format_diagnosis(diagnose(model, n_train=args.diagnose, n=args.n)))
    print("```\n\n## Heads x properties: direct effect on the zero-shot margin\n")
    effects = head_property_effects(model, n=min(500, args.n))
    props = effects["properties"]
    e = effects["effects"]
    print("| head | " + " | ".join(props) + " |")
    print("| --- | " + " | ".join("---:" for _ in props) + " |")
    for layer in range(e.shape[0]):
        for head in range(e.shape[1]):
            row = e[layer, head]
            cells = [f"**{v:+.3f}**" if v == e[..., k].max() else f"{v:+.3f}" for k, v in enumerate(row)]
            print(f"| L{layer}.H{head} | " + " | ".join(cells) + " |")
    print("\nTop 3 heads per property: " + "; ".join(
        f"{p}: " + ", ".join(f"L{i // e.shape[1]}.H{i % e.shape[1]}" for i in np.argsort(-e[..., k].ravel())[:3])
        for k, p in enumerate(props)))

    with tempfile.TemporaryDirectory() as tmp:
        run = index_images(model, f"toyworld:{args.index}:1", Path(tmp) / "run", progress=False)
        print(f"\n## Mean-ablation study ({len(run)} held-out images, analysed layers {run.layers})\n\n```")
        print(format_table(ablation_study(run, model), "zero-shot accuracy"))
        print("```\n\n## TextSpan with the toy pool (m=5, rank 80)\n")
        result = textspan_run(run, model, load_pool("toy"), m=5, rank=80, progress=False)
        print("| head | TextSpan descriptions (category, share of variance) |")
        print("| --- | --- |")
        for name, head in result["heads"].items():
            picks = "; ".join(f"{t} ({c}, {x:.0%})" for t, c, x in zip(head["texts"], head["categories"],
                                                                       head["explained"]))
            print(f"| {name} | {picks} |")
        print("\n```")
        print(format_table(result["reconstruction"], "zero-shot accuracy, analysed heads replaced by their "
                                                     "TextSpan reconstructions (other layers, MLPs mean-ablated)"))
        print("```")


if __name__ == "__main__":
    main()
