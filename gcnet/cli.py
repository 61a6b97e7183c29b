"""`gcnet`: one subcommand per module; each module's `register(subparsers)` adds its parser.

A module is skipped only when its file does not exist (another engineer may not have written
it yet); any other import error is a bug and is raised. A `gcnet.errors.UsageError` (a bad
flag, an unreadable file), a missing input or an output that would be overwritten prints as
one line `gcnet: error: ...`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .errors import UsageError

COMMAND_MODULES = ("gcnet.info", "gcnet.bench", "gcnet.checkpoint", "gcnet.train", "gcnet.evaluate",
                   "gcnet.predict", "gcnet.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gcnet", description="GCNet-S/M/L: train, evaluate, deploy with reparam")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, FileNotFoundError, FileExistsError) as e:  # what the user gave: one line, no traceback
        print(f"gcnet: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
