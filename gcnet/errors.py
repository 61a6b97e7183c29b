"""Errors in what a user asked for (a flag, a recipe, a file, a missing optional package):
`gcnet` prints them as one line `gcnet: error: ...` and exits with `exit_code` (2, as argparse
does for a bad flag), without a traceback (`--debug` shows it). Anything else is a bug."""
from __future__ import annotations

import importlib


class UsageError(ValueError):
    exit_code = 2


class ConfigError(UsageError):
    """A recipe value that cannot work (`--iters -5`, `--ratio-range 2 0.5`); the message names the flag."""


class CheckpointError(UsageError):
    """A file that cannot be read, or does not hold the model asked for; the message names the file."""


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite; the message says at which iteration and what to try.
    Not a mistake in the command: the run failed, so the exit status is 1."""
    exit_code = 1


class MissingExtra(UsageError):
    """An optional package a command needs is not installed; the message names the extra."""


# import name → (package to install, the reparam extra that holds it)
EXTRAS = {"PIL": ("pillow", "gcnet"), "matplotlib": ("matplotlib", "gcnet"), "onnx": ("onnx", "export"),
          "onnxruntime": ("onnxruntime", "export"), "onnxscript": ("onnxscript", "export")}


def require(module: str, purpose: str):
    """Import `module` (e.g. "PIL.Image") or raise MissingExtra saying which extra to install.

    purpose: what needs it, for the message ("reading images")."""
    top = module.split(".")[0]
    try:
        importlib.import_module(top)  # the package first: a cached submodule would hide its absence
        return importlib.import_module(module)
    except ImportError:
        package, extra = EXTRAS.get(top, (top, "dev"))
        raise MissingExtra(f"{purpose} needs {package}, which is not installed: "
                           f"pip install 'reparam[{extra}]'") from None
