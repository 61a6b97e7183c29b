"""Errors in what a user asked for (a flag, a recipe, a file): `gcnet` prints them as one line
`gcnet: error: ...` and exits with `exit_code`, without a traceback. Anything else is a bug."""


class UsageError(ValueError):
    exit_code = 1


class ConfigError(UsageError):
    """A recipe value that cannot work (`--iters -5`, `--ratio-range 2 0.5`); the message names the flag."""
    exit_code = 2


class CheckpointError(UsageError):
    """A file that cannot be read, or does not hold the model asked for; the message names the file."""


class TrainingDiverged(UsageError):
    """The loss became NaN or infinite; the message says at which iteration and what to try."""
