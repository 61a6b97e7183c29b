"""Helpers to check that a fused model computes what the original computes."""
from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_leaves


def rel_error(expected, actual) -> float:
    """Max |expected - actual| over max |expected|, over every tensor leaf of two outputs.

    Relative to the largest magnitude because random-init nets can have huge activations.
    Non-finite values must match exactly (NaN where NaN, the same infinities): else inf."""
    exp = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    act = [t for t in tree_leaves(actual) if isinstance(t, torch.Tensor)]
    if len(exp) != len(act):
        raise AssertionError(f"outputs differ in structure: {len(exp)} tensors vs {len(act)}")
    worst = 0.0
    for e, a in zip(exp, act):
        if e.shape != a.shape:
            raise AssertionError(f"output shapes differ: {tuple(e.shape)} vs {tuple(a.shape)}")
        e, a = e.detach().double(), a.detach().double()
        finite = e.isfinite() & a.isfinite()
        if not (torch.equal(e.isnan(), a.isnan()) and torch.equal(e[~finite].nan_to_num(0.0), a[~finite].nan_to_num(0.0))):
            return math.inf
        e, a = e[finite], a[finite]
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (e - a).abs().max().item() if e.numel() else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


@torch.no_grad()
def model_rel_error(original: torch.nn.Module, fused: torch.nn.Module, *inputs) -> float:
    """rel_error of two models' outputs on the same inputs (both run as given: call .eval() first)."""
    return rel_error(original(*inputs), fused(*inputs))


def assert_equivalent(original, fused, *inputs, rtol: float = 1e-5) -> float:
    err = model_rel_error(original, fused, *inputs)
    assert err <= rtol, f"fused model differs: relative error {err:.3g} > {rtol:g}"
    return err
