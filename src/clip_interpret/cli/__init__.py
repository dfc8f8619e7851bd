"""The ``clip-interpret`` command line: one console script, one subcommand per job.

Rooms: ``common`` (what every command shares), ``decompose`` (models, decompose), ``runs``
(index, ablate, textspan), ``toyworld``, ``study`` (label ... analyze, demo) and
``analyses`` (the five analyses and the web app), ``segbench`` (the zero-shot segmentation benchmark), ``spectra``
(heads read from their weights), ``debias`` (spurious heads located and corrected).
Each registers its subcommands.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import ClipInterpretError


def build_parser() -> argparse.ArgumentParser:
    from . import analyses, debias, decompose, runs, segbench, spectra, study, toyworld

    parser = argparse.ArgumentParser(
        prog="clip-interpret",
        description="Open up CLIP-like models head by head: exact decomposition of image embeddings.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for room in (decompose, runs, toyworld, study, analyses, segbench, spectra, debias):
        room.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        return args.func(args)
    except ClipInterpretError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
