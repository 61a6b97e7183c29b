"""`gcnet`: one subcommand per module; each module's `register(subparsers)` adds its parser.

A module is skipped only when its file does not exist (another engineer may not have written
it yet); any other import error is a bug and is raised, so command modules import optional
packages (PIL, onnx, ...) where they use them, through `gcnet.errors.require`, and `--help`
works without them. Expected failures print one line `gcnet: error: ...` and exit 2: a
`gcnet.errors.UsageError` (a bad flag or recipe value, an unreadable file, a missing optional
package), a missing input, an output that would be overwritten. `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from reparam import __version__
from reparam.cli import OneLineParser

from .errors import UsageError

COMMAND_MODULES = ("gcnet.info", "gcnet.bench", "gcnet.checkpoint", "gcnet.train", "gcnet.evaluate",
                   "gcnet.predict", "gcnet.export")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gcnet", description="GCNet-S/M/L: train, evaluate, deploy with reparam")
    parser.add_argument("--version", action="version", version=f"gcnet (reparam {__version__})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():  # also accepted after the command; SUPPRESS keeps the main's value
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        sub.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                         help="no progress lines on stderr")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, OSError) as e:  # what the user gave: one line, no traceback
        if args.debug:
            raise
        print(f"gcnet: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
