"""`gcnet`: one subcommand per module; each module's `register(subparsers)` adds its parser.

A module is skipped only when its file does not exist (another engineer may not have written
it yet); any other import error is a bug and is raised.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util

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
    return args.func(args)
