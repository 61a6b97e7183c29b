"""Hypothesis profiles for the rule suite, and torch's global RNG under hypothesis's control.

Choose a profile with `REPARAM_PROFILE=dev|ci|thorough` (default `ci`) or pytest's
`--hypothesis-profile NAME` (which wins over the variable):
  dev       a handful of examples per property, for editing a rule
  ci        the whole rule suite in about two minutes on two cores, the same examples every
            run (derandomized): a red CI is the change's doing; new examples come from the others
  thorough  thousands of examples per property (run it before a release, or after a rule change)
REPARAM_MAX_EXAMPLES=N sets the number of examples per property on top of the profile.
deadline=None everywhere: a fuse traces, rewrites and counts ops, and CPU timing is noisy.
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, register_random, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
# The blocks are tiny: with several threads on a shared 2-core machine a conv spends its time
# waking threads (30 ms instead of 1 ms), which made the suite ten times slower.
torch.set_num_threads(1)

settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("REPARAM_PROFILE", "ci"))
if os.environ.get("REPARAM_MAX_EXAMPLES"):  # e.g. a long differential run of the foreign-code suite
    settings.register_profile("custom", settings(max_examples=int(os.environ["REPARAM_MAX_EXAMPLES"])))
    settings.load_profile("custom")


class _TorchGlobalRNG:
    """torch's global generator, shaped like random.Random for `hypothesis.register_random`.

    Weights and inputs come from a `torch.Generator` seeded with a drawn seed (see
    `strategies.seeds`); this only makes incidental global draws (default module init)
    the same in every run of an example, and restores the state afterwards."""

    def seed(self, s):
        torch.manual_seed(s)

    def getstate(self):
        return torch.random.get_rng_state()

    def setstate(self, state):
        torch.random.set_rng_state(state)


_TORCH_RNG = _TorchGlobalRNG()  # register_random keeps only a weak reference
register_random(_TORCH_RNG)
