"""The known-answer labelling benchmark and the demo's wall time, printed as Markdown.

1. Times the whole study exactly as `clip-interpret demo` runs it (bundled toy
   model, 5,000 held-out toy-world images, all 6 layers, toy pool), per step,
   against the 5-minute target.
2. On that run, scores every offline labeller: heads labelled and abstained,
   association (judged independently of the labeller), entanglement with its
   floor and normalised form, and the share of labels confirmed by single-head
   mean ablation (margin drops; accuracy drops alone beside it) with its chance
   baseline (the same labels shuffled over the heads). The toy world is the known
   answer: a label is right when ablating the head hurts its own property most.

3. The same labels under the two verdict rules (``margin``, ``relative``: docs/study.md) and with
   the labels below a confidence (--min-confidence, default 0.6) counted as abstentions.

    python bench/study.py [--n 5000] [--world-seed 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--world-seed", type=int, default=1, help="toy-world seed of the images (default 1, the "
                                                                     "demo's; the model was trained on world 0)")
    parser.add_argument("--min-confidence", type=float, default=0.6,
                        help="the confidence below which table 3 counts a label as an abstention (default 0.6)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one, removed after)")
    args = parser.parse_args()

    from clip_interpret.faithfulness import confident_labels, confirm_labels
    from clip_interpret.labels.judges import judge_labels
    from clip_interpret.metrics import scores
    from clip_interpret.study import analyze, step_label

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "demo")
        started = time.time()
        result = analyze("toy", f"toyworld:{args.n}:{args.world_seed}", out, pool="toy", labellers=("taxonomy", "embedding"),
                         layers="all", encoder="minilm", progress=False, log=lambda line: None)
        total = time.time() - started
        print(f"## The demo's study ({args.n} held-out images of world {args.world_seed}, 2 CPU cores)\n")
        print("| step | seconds |\n|---|---|")
        for step, seconds in result["timings"].items():
            print(f"| {step} | {seconds:.1f} |")
        print(f"| **total (incl. model load)** | **{total:.1f}** (target < 300, ratio {total / 300:.2f}) |\n")

        import json

        drops = json.loads((out / "faithfulness.json").read_text())
        run = result["run"]
        textspan = out / "textspan-toy.json"
        print("## Known-answer labelling benchmark (toy model, all 48 heads)\n")
        print("Association judged independently of the labeller (docs/study.md); entanglement with its floor "
              "(7 properties) and normalised form; confirmed share beside the same labels shuffled over the "
              "heads (1,000 seeded permutations: mean, 95th percentile, p).\n")
        print("| labeller | labelled | abstained | association (judge) | entanglement (floor, normalised) "
              "| confirmed by ablation | chance: mean / 95th pct | p | by accuracy drops alone |")
        print("|---|---|---|---|---|---|---|---|---|")
        textspan_data = json.loads(textspan.read_text())
        by_rule = []
        for name, labeller, encoder in (("taxonomy (toy pool tags)", "taxonomy", "model"),
                                        ("embedding, model's text encoder", "embedding", "model"),
                                        ("embedding, MiniLM", "embedding", "minilm")):
            labels, _ = step_label(run, None if encoder == "minilm" or labeller == "taxonomy" else _model(),
                                   labeller, textspan, encoder=encoder, vocabulary="toy", progress=False,
                                   make_current=False, force=True)
            verdict = judge_labels(labels, textspan_data, toy=True)
            s = scores(labels["heads"], judgements=verdict["judgements"], judge=verdict["detail"], n_candidates=7)
            c = confirm_labels({h: e["label"] for h, e in labels["heads"].items()}, drops)
            chance = c["chance"]
            print(f"| {name} | {s['n_labelled']}/{s['n_heads']} | {s['n_abstained']} "
                  f"| {s['association']:.3f} ({verdict['judge']} judge) | {s['entanglement']:.3f} "
                  f"({s['entanglement_floor']:.3f}, {s['entanglement_normalised']:.2f}) "
                  f"| {c['confirmed']}/{c['testable']} = {c['share_confirmed']:.0%} "
                  f"| {chance['mean']:.0%} / {chance['p95']:.0%} | {chance['p_value']:.3g} "
                  f"| {c['share_confirmed_by_accuracy']:.0%} |")
            for verdict in ("margin", "relative"):
                for floor in (0.0, args.min_confidence):
                    v = confirm_labels(confident_labels(labels["heads"], floor), drops, verdict=verdict)
                    by_rule.append((name, verdict, floor, v))
        print(f"\n## Verdict rules and a confidence floor (the labels above; labels below the floor count as "
              f"abstentions)\n")
        print("| labeller | verdict rule | confidence floor | confirmed by ablation | chance: mean / 95th pct | p |")
        print("|---|---|---|---|---|---|")
        for name, verdict, floor, v in by_rule:
            chance = v["chance"]
            share = f"{v['confirmed']}/{v['testable']} = {v['share_confirmed']:.0%}" if v["testable"] else "n/a"
            mean_p95 = f"{chance['mean']:.0%} / {chance['p95']:.0%}" if chance["mean"] is not None else "n/a"
            print(f"| {name} | {verdict} | {floor:g} | {share} | {mean_p95} | {chance['p_value']:.3g} |")
        print("\nThe llm labeller needs a chat endpoint, which this machine does not have; its protocol, retries, "
              "timeouts and cache are tested against a local server (tests/study/test_llm.py).")


_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        from clip_interpret import load_model

        _MODEL = load_model("toy")
    return _MODEL


if __name__ == "__main__":
    main()
