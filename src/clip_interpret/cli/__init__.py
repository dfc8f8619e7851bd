"""The ``clip-interpret`` command line: one console script, one subcommand per job.

One module per job a user has in mind, each registering its subcommands (docs/architecture.md):
``models``, ``decompose``, ``index`` (make a run), ``ablate`` (the mean-ablation study, or interventions on
chosen heads), ``textspan``, ``toyworld``, ``label``, ``faithfulness``, ``scores`` (metrics, report),
``analyze`` (analyze, demo: the whole study), ``analyses`` (the five analyses of a run), ``app`` (them in the
browser), ``segbench``, ``spectra`` (heads read from their weights), ``debias`` (spurious heads
located and corrected); ``common`` holds what they share. The commands parse and print; the work is the
library's.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import ClipInterpretError


def build_parser() -> argparse.ArgumentParser:
    from . import (ablate, analyses, analyze, app, decompose, faithfulness, index, label, models, scores, segbench,
                   spectra, debias, textspan, toyworld)

    parser = argparse.ArgumentParser(
        prog="clip-interpret",
        description="Open up CLIP-like models head by head: exact decomposition of image embeddings.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for room in (models, decompose, index, ablate, textspan, toyworld, label, faithfulness, scores, analyze, analyses,
                 app, segbench, spectra, debias):
        room.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with warnings.catch_warnings():  # restored after the command; a fresh once-per-place memory for it
        # every warning the command meets is one line on stderr, as it happens (also when the caller,
        # e.g. a test runner, records warnings instead of printing them)
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        try:
            return args.func(args)
        except ClipInterpretError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
