"""reparam.fuse on timm's re-parameterizable families, against timm's own converter.

For the smallest variant of each family (random weights, random BN statistics, 64×64 input):
the fused training form runs at most as many convs and BNs as `reparameterize_model` leaves,
no more multiply-accumulates, and computes the original function (rel. error ≤ 1e-5)."""
import sys
from pathlib import Path

import pytest

timm = pytest.importorskip("timm")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `benchmarks`

import reparam  # noqa: E402
from benchmarks.vs_timm import FAMILIES, build, timm_deploy  # noqa: E402
from reparam.testing import assert_equivalent  # noqa: E402


PARAMS = [pytest.param(*f, id=f[1]) for f in FAMILIES]


@pytest.mark.parametrize("family, name, kwargs", PARAMS)
def test_fuse_matches_or_beats_timm(family, name, kwargs):
    model, x = build(name, kwargs)
    theirs, ours = timm_deploy(model), reparam.fuse(model, (x,))
    t, o = reparam.count(theirs, (x,)), reparam.count(ours, (x,))
    assert o.convs <= t.convs and o.bns <= t.bns, \
        f"{name}: convs/BNs {o.convs}/{o.bns} after reparam.fuse vs {t.convs}/{t.bns} after timm"
    assert o.macs <= t.macs * (1 + 1e-6), f"{name}: {o.macs:.4g} MACs vs timm's {t.macs:.4g}"
    assert_equivalent(model, ours, x, rtol=1e-5)


def test_training_mode_model_is_left_alone():
    """Users forget .eval(): fuse works on the eval-mode function of a copy."""
    model, x = build("repvgg_a0", {})
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = reparam.fuse(model, (x,))
    assert model.training
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())
    assert_equivalent(model.eval(), fused, x)


def test_model_whose_root_does_not_trace_fuses_without_example_inputs():
    """EfficientViT-MSRA branches on shapes: without example inputs each traceable submodule is
    fused on its own, and the parent still reads their attributes (`self.attn.resolution`)."""
    model, x = build("efficientvit_m0", {"img_size": 64})
    fused, report = reparam.fuse_with_report(model)
    assert report.untraced and report.rewrites
    assert reparam.count(fused, (x,)).bns < reparam.count(model, (x,)).bns
    assert_equivalent(model, fused, x, rtol=1e-5)
