"""Benchmark of the input pipeline on this machine (CPU): indexing a JPEG folder.

    python bench/pipeline.py [--n 2000] [--baseline 81f1f72]

The bundled toy model indexes N photo-like JPEGs (~500x375, bench/_photos.py):

* baseline: the same command with the code of an earlier commit (``--baseline``,
  default the last commit before the pipeline: one decoding thread, one batch
  ahead), checked out into a temporary worktree and run in a subprocess;
* the pipeline with 0, 1 and 2 worker processes and each decoder (pil, torch),
  and pil with JPEG draft mode;
* the model alone on the same images, preprocessed in advance (the ceiling).

Each configuration runs in a fresh process, one after the other; ratios are to
the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _photos import make_photos  # bench/_photos.py

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time, tempfile, torch
from pathlib import Path
from clip_interpret import load_model
from clip_interpret.runstore import index_images
kwargs = json.loads(sys.argv[2])
model = load_model("toy", **({"device": "cpu"} if kwargs.pop("new", False) else {}))
with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    run = index_images(model, sys.argv[1], Path(tmp) / "run", progress=False, **kwargs)
    elapsed = time.perf_counter() - start
print(json.dumps({"images": len(run), "seconds": elapsed}))
"""

CEILING = """
import json, sys, time, torch
from pathlib import Path
from clip_interpret import load_model
from clip_interpret.decompose import decompose_pixels
from clip_interpret.pipeline import ListSource, pixel_batches
model = load_model("toy", device="cpu")
files = sorted(str(p) for p in Path(sys.argv[1]).glob("*.jpg"))
batches = [list(range(s, min(len(files), s + 64))) for s in range(0, len(files), 64)]
pixels = [b.pixels for b in pixel_batches(ListSource(files), model.preprocess, batches, workers=2)]
start = time.perf_counter()
for p in pixels:
    decompose_pixels(model.vit, p)
print(json.dumps({"images": len(files), "seconds": time.perf_counter() - start}))
"""


def _child(code: str, folder: Path, kwargs: dict | None = None, src: Path = REPO / "src") -> dict:
    done = subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(kwargs or {})], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(src)))
    if done.returncode:
        raise SystemExit(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["img_s"] = result["images"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--baseline", default="81f1f72", help="commit whose index is the baseline")
    args = parser.parse_args()

    import torch

    from clip_interpret.device import cores

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        made = make_photos(folder, args.n)
        print(f"{args.n} JPEG photos 500x375 made in {made:.1f} s; {cores()} cores, torch {torch.__version__}")
        worktree = tmp / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(worktree), args.baseline],
                       check=True)
        try:
            base = _child(CHILD, folder, {}, worktree / "src")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True)
        print(f"\nbaseline (commit {args.baseline}): {base['img_s']:.0f} img/s")
        rows = [("workers 0, decode pil", {"workers": 0, "decode": "pil"}),
                ("workers 1, decode pil", {"workers": 1, "decode": "pil"}),
                ("workers 2, decode pil", {"workers": 2, "decode": "pil"}),
                ("workers 2, decode pil + draft", {"workers": 2, "decode": "pil", "draft": True}),
                ("workers 0, decode torch", {"workers": 0, "decode": "torch"}),
                ("workers 2, decode torch (the default here)", {"workers": 2, "decode": "auto"})]
        figures = {"baseline": base, "rows": {}}
        print(f"{'configuration':<44} {'img/s':>7} {'vs baseline':>12}")
        for label, kwargs in rows:
            result = _child(CHILD, folder, {**kwargs, "new": True})
            figures["rows"][label] = result
            print(f"{label:<44} {result['img_s']:>7.0f} {result['img_s'] / base['img_s']:>11.2f}x")
        ceiling = _child(CEILING, folder)
        figures["model_only"] = ceiling
        print(f"{'the model alone (pixels ready in memory)':<44} {ceiling['img_s']:>7.0f} "
              f"{ceiling['img_s'] / base['img_s']:>11.2f}x")
    print("\n" + json.dumps(figures))


if __name__ == "__main__":
    main()
