"""What each help of the toy CLIP v2 recipe contributes, at the CLIP level: the bundled recipe with one
help removed at a time, trained for the same short budget, evaluated zero-shot on held-out images.

Each variant is one resumable `clip-interpret toyworld train` run (rerun this script after an
interruption and every finished variant is read back, an unfinished one resumes from its last
checkpoint). Prints one Markdown row per variant: per-property zero-shot accuracy, recall@1 and wall time.

    python bench/toy_helps.py                       # 750 steps each, 300 held-out images
    python bench/toy_helps.py --steps 1000 --variants full,no-probe
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RECIPE = ["--model", "toy-v2", "--lr", "1e-3", "--device", "cpu"]  # the bundled run's, as in docs/toy-model.md
VARIANTS = {
    "full": (["--probe-weight", "1", "--prompt-weight", "0.5"], "contrastive + probe help + prompt help (bundled)"),
    "no-probe": (["--probe-weight", "0", "--prompt-weight", "0.5"], "contrastive + prompt help"),
    "no-prompt": (["--probe-weight", "1", "--prompt-weight", "0"], "contrastive + probe help"),
    "contrastive": (["--probe-weight", "0", "--prompt-weight", "0"], "contrastive loss alone"),
}
PROPERTIES = ("shape", "color", "size", "count", "position", "background", "pattern")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--eval-n", type=int, default=300)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="runs/toy-helps", help="one run folder per variant under this one")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    rows = []
    for name in chosen:
        flags, what = VARIANTS[name]
        out = Path(args.out) / f"{name}-{args.steps}"
        summary = out / "summary.json"
        if not summary.is_file():
            command = [sys.executable, "-m", "clip_interpret", "toyworld", "train", "--out", str(out),
                       "--steps", str(args.steps), "--warmup", str(max(1, args.steps // 10)),
                       "--checkpoint-every", "250", "--eval-n", str(args.eval_n), *RECIPE, *flags]
            print("$ " + " ".join(command[1:]), flush=True)
            subprocess.run(command, check=True)
        data = json.loads(summary.read_text())
        rows.append((name, what, data))
    print(f"\n| variant ({args.steps} steps of batch 128; {args.eval_n} held-out images of world 1) | "
          + " | ".join(PROPERTIES) + " | recall@1 | wall time |")
    print("|---|" + "---:|" * (len(PROPERTIES) + 2))
    for name, what, data in rows:
        zs = data["eval"]["zero_shot"]
        cells = " | ".join(f"{100 * zs[p]['accuracy']:.1f}%" for p in PROPERTIES)
        print(f"| {name}: {what} | {cells} | {100 * data['eval']['retrieval']['recall@1']:.1f}% "
              f"| {data['elapsed_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
