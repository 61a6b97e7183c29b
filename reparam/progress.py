"""Feedback on long work: step lines and tqdm bars on stderr, only when stderr is a terminal.

    progress = Progress("reparam", quiet=args.quiet)
    progress.step("fusing")                       # "reparam: fusing" on stderr
    for x in progress.bar(items, desc="timing"): ...

stdout stays the result alone, so `reparam report ... > report.txt` holds the report only.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, prog: str, quiet: bool = False):
        self.prog = prog
        self.enabled = not quiet and sys.stderr.isatty()

    def step(self, text: str) -> None:
        """One line saying what starts now."""
        if self.enabled:
            print(f"{self.prog}: {text}", file=sys.stderr, flush=True)

    def bar(self, iterable=None, **kwargs):
        """tqdm on stderr, or the plain iterable when disabled."""
        return tqdm(iterable, disable=not self.enabled, file=sys.stderr, leave=False, dynamic_ncols=True,
                    **kwargs)


QUIET = Progress("", quiet=True)  # for library calls: no output
