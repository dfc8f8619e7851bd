"""Start-up of the command line: wall time of `--help`, every subcommand's `--help`, `models` (an
empty cache, then the cache) and one toy analysis end to end (Python starts, the model loads, the
analysis runs), each the median of --repeat runs in a fresh process.

    python bench/startup.py [--repeat 3]

Targets (issue 24): every `--help` under 0.5 s, `models` under 3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(args: list[str], env: dict, repeat: int, fresh_cache: bool = False) -> float:
    times = []
    for _ in range(repeat):
        run_env = dict(env)
        if fresh_cache:
            run_env["CLIP_INTERPRET_CACHE"] = tempfile.mkdtemp(prefix="ci-startup-")
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "clip_interpret", *args], env=run_env, capture_output=True,
                              text=True)
        times.append(time.perf_counter() - began)
        if done.returncode != 0:
            raise SystemExit(f"clip-interpret {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CLIP_INTERPRET_OFFLINE="1", HF_HUB_OFFLINE="1")
    from clip_interpret.cli import build_parser  # torch-free

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    rows = [("--help", wall(["--help"], env, opts.repeat))]
    helps = {name: wall([name, "--help"], env, opts.repeat) for name in sub.choices}
    slowest = max(helps, key=helps.get)
    rows.append((f"each subcommand's --help ({len(helps)}): slowest, {slowest}", helps[slowest]))
    rows.append(("models, empty cache", wall(["models"], env, opts.repeat, fresh_cache=True)))
    wall(["models"], env, 1)
    rows.append(("models, cached", wall(["models"], env, opts.repeat)))
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "toy"
        subprocess.run([sys.executable, "-m", "clip_interpret", "index", "--model", "toy", "--images",
                        "toyworld:200:1", "--out", str(run)], env=env, check=True, capture_output=True)
        rows.append(("text-nn end to end (200-image toy run)",
                     wall(["text-nn", str(run), "--text", "a red circle", "--head", "L5.H3", "--out",
                           str(Path(folder) / "out")], env, opts.repeat)))
    print(f"{'command':<60} {'median s':>9}")
    for name, seconds in rows:
        print(f"{name:<60} {seconds:>9.2f}")
    worst_help = max(rows[0][1], rows[1][1])
    print(f"\n--help target 0.5 s: worst {worst_help:.2f} s ({worst_help / 0.5:.2f}x the target); "
          f"models target 3 s: {rows[2][1]:.2f} s ({rows[2][1] / 3:.2f}x)")


if __name__ == "__main__":
    main()
