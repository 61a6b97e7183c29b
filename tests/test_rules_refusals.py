"""Where a rewrite would not be exact the rule refuses: the fused model still computes the same
function, the ops stay, and the report names the place and why (FINDINGS.md's traps)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import reparam
from reparam.nn import BNAndPad
from reparam.testing import assert_equivalent

from strategies import (affine_after_sums, bias_before_padded_conv, cases, counts, different_inputs, fuse_checked,
                        linear_bn_3d, linear_norms, misaligned_sums, non_zero_padding, pools_excluding_padding,
                        randomize, shared_convs, skipped, tapped, tapped_sums, without_running_stats)


def check_refused(case):
    """Equivalent, nothing merged, and a skipped place whose reason contains case.reason."""
    fused, report = fuse_checked(case)
    assert counts(fused, case.x) == counts(case.model, case.x)
    assert skipped(report, case.reason), f"no skipped place says {case.reason!r}:\n{report}"


# ---- negative properties ----

@given(cases(bias_before_padded_conv()))
def test_bias_before_a_zero_padded_conv_is_refused(case):
    check_refused(case)


@given(cases(non_zero_padding()))
def test_padding_mode_other_than_zeros_is_refused(case):
    check_refused(case)


@given(cases(misaligned_sums()))
def test_sum_with_stride_or_centre_mismatch_is_refused(case):
    check_refused(case)


@given(cases(pools_excluding_padding()))
def test_pool_excluding_padding_is_refused(case):
    check_refused(case)


@given(cases(shared_convs()))
def test_module_called_from_two_places_is_refused(case):
    check_refused(case)


@given(cases(tapped()))
def test_branch_whose_output_is_used_elsewhere_is_refused(case):
    check_refused(case)


@given(cases(tapped_sums()))
def test_summed_branch_whose_output_is_used_elsewhere_keeps_its_conv(case):
    fused, _ = fuse_checked(case)
    assert counts(fused, case.x)[0] >= 1  # a(x) is still returned
    assert counts(fused, case.x)[0] <= counts(case.model, case.x)[0]


@given(cases(without_running_stats()))
def test_bn_without_running_stats_is_refused(case):
    check_refused(case)


@given(cases(different_inputs()))
def test_residual_add_of_convs_on_different_inputs_keeps_both_convs(case):
    fused, _ = fuse_checked(case)
    assert counts(fused, case.x) == (2, 0)  # each conv-BN folds, the sum stays


@given(cases(affine_after_sums(tap=True)))
def test_affine_after_a_sum_read_elsewhere_is_refused(case):
    check_refused(case)


@given(cases(linear_norms(exact=False), with_inputs=True))
def test_bn1d_through_a_flatten_that_keeps_a_spatial_dim_is_refused(case):
    check_refused(case)


@given(cases(linear_bn_3d()))
def test_linear_then_bn1d_on_3d_input_is_refused(case):
    check_refused(case)


# ---- table: a fixed bad input, the rule that refuses it, and the reason it must give ----

class Net(nn.Module):
    """Named layers and a forward given as a function of (self, x), so paths read well."""

    def __init__(self, forward, **layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)
        self.fn = forward

    def forward(self, x):
        return self.fn(self, x)


def conv(cin, cout, k, stride=1, padding=0, **kw):
    return nn.Conv2d(cin, cout, k, stride, padding, **kw)


def seq(**layers):
    """The layers applied in order."""
    return Net(lambda m, x: functools.reduce(lambda y, layer: layer(y), m.children(), x), **layers)


def summed(**layers):
    """The layers applied to x, summed."""
    return Net(lambda m, x: sum(layer(x) for layer in m.children()), **layers)


def with_stats(model):
    """Buffers `mean` and `var` (4 channels) for a forward that calls F.batch_norm."""
    model.register_buffer("mean", torch.zeros(4))
    model.register_buffer("var", torch.ones(4))
    return model


BN2 = nn.BatchNorm2d
BAD = [
    # id, model factory, input shape, rule, reason substring, path substring
    ("1x1-bias-then-padded-3x3", lambda: seq(a=conv(3, 4, 1), b=conv(4, 4, 3, padding=1)),
     (2, 3, 6, 6), "merge_sequential", "zero-padded", "b"),
    ("bn-then-padded-3x3", lambda: seq(bn=BN2(3), b=conv(3, 4, 3, padding=1)),
     (2, 3, 6, 6), "merge_sequential", "zero-padded", "b"),
    ("1x1-bias-then-bnandpad", lambda: seq(a=conv(3, 4, 1), pad=BNAndPad(4, padding=1)),
     (2, 3, 6, 6), "merge_sequential", "zero-padded", "pad"),
    ("3x3-then-3x3", lambda: seq(a=conv(3, 4, 3, padding=1), b=conv(4, 4, 3, padding=1)),
     (2, 3, 6, 6), "merge_sequential", "only a 1×1 stride-1", "b"),
    ("strided-1x1-then-3x3", lambda: seq(a=conv(3, 4, 1, stride=2), b=conv(4, 4, 3)),
     (2, 3, 8, 8), "merge_sequential", "only a 1×1 stride-1", "b"),
    ("reflect-conv-then-bn", lambda: seq(a=conv(3, 4, 3, padding=1, padding_mode="reflect"), bn=BN2(4)),
     (2, 3, 6, 6), "merge_sequential", "padding_mode 'reflect'", "a"),
    ("circular-conv-then-bn", lambda: seq(a=conv(3, 4, 3, padding=1, padding_mode="circular"), bn=BN2(4)),
     (2, 3, 6, 6), "merge_sequential", "padding_mode 'circular'", "a"),
    ("even-kernel-same-padding", lambda: seq(a=conv(3, 4, 2, padding="same"), bn=BN2(4)),
     (2, 3, 6, 6), "merge_sequential", "asymmetrically", "a"),
    ("stride-mismatch-in-sum", lambda: summed(a=conv(2, 2, 1), b=conv(2, 2, 1, stride=2)),
     (2, 2, 1, 1), "merge_sum", "different strides", ""),
    ("centre-mismatch-in-sum", lambda: summed(a=conv(2, 2, 3, stride=3), b=conv(2, 2, 1, stride=3)),
     (2, 2, 6, 6), "merge_sum", "not aligned", ""),
    ("dilation-mismatch-in-sum", lambda: summed(a=conv(2, 2, 3, 3, 1, dilation=2), b=conv(2, 2, 3, 3, 1)),
     (2, 2, 6, 6), "merge_sum", "not aligned", ""),
    ("pool-excluding-pad-after-1x1",
     lambda: seq(a=conv(3, 3, 1, bias=False), p=nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
     (2, 3, 6, 6), "merge_sequential", "count_include_pad", "p"),
    ("pool-excluding-pad-in-sum",
     lambda: summed(a=conv(3, 3, 3, padding=1), p=nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
     (2, 3, 6, 6), "merge_sum", "count_include_pad", ""),
    ("pool-ceil-mode", lambda: seq(a=conv(3, 3, 1, bias=False), p=nn.AvgPool2d(2, 2, ceil_mode=True)),
     (2, 3, 5, 5), "merge_sequential", "ceil_mode", "p"),
    ("shared-conv", lambda: Net(lambda m, x: (m.bn(m.c(x)), m.c(x)), c=conv(3, 3, 3, padding=1), bn=BN2(3)),
     (2, 3, 6, 6), "merge_sequential", "called from 2 places", "c"),
    ("output-also-used", lambda: Net(lambda m, x: (lambda c: (m.bn(c), c))(m.c(x)), c=conv(3, 3, 3), bn=BN2(3)),
     (2, 3, 6, 6), "merge_sequential", "also used", "c"),
    ("bn-without-running-stats", lambda: seq(a=conv(3, 4, 3), bn=BN2(4, track_running_stats=False)),
     (2, 3, 6, 6), "merge_sequential", "running statistics", "bn"),
    ("f-batch-norm-training",
     lambda: with_stats(Net(lambda m, x: F.batch_norm(m.a(x), m.mean, m.var, training=True), a=conv(3, 4, 3))),
     (2, 3, 6, 6), "merge_sequential", "training=True", ""),
    ("linear-bn1d-3d", lambda: seq(l=nn.Linear(5, 4), bn=nn.BatchNorm1d(3)),
     (2, 3, 5), "merge_sequential", "2-D", ""),
    ("concat-along-height", lambda: Net(lambda m, x: torch.cat([m.a(x), m.b(x)], dim=2), a=conv(3, 4, 1), b=conv(3, 4, 1)),
     (2, 3, 6, 6), "merge_concat", "not channels", ""),
]


@pytest.mark.parametrize("with_inputs", [True, False], ids=["inputs", "no-inputs"])
@pytest.mark.parametrize("make, shape, rule, reason, path", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_left_alone_with_its_reason(make, shape, rule, reason, path, with_inputs):
    model = randomize(make(), seed=0).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    assert_equivalent(model, fused, x)
    assert counts(fused, x) == counts(model, x)
    found = [s for s in report.skipped if s.rule == rule and reason in s.reason and path in s.path]
    assert found, f"expected a {rule} skip at '{path}' saying {reason!r}:\n{report}"


class ReshapeCopyMutated(nn.Module):
    """z = y.reshape(...) copies a non-contiguous y; z.reshape_as(y) is then mutated in place.
    Dropping the round trip (undo_reshape) would double y itself, which the output also reads."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).transpose(2, 3)
        out = y.reshape(y.shape[0], -1).reshape_as(y)
        out.mul_(2)
        return out + y


@pytest.mark.parametrize("with_inputs", [True, False])
def test_reshape_round_trip_mutated_in_place_is_kept(with_inputs):
    model, x = ReshapeCopyMutated().eval(), torch.randn(2, 3, 5, 7)
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    assert_equivalent(model, fused, x)
    assert not any(r.rule == "undo_reshape" for r in report.rewrites), str(report)


class ScaledSum(nn.Module):
    """A 5-d constant times a sum of conv+BN branches on different inputs: the product is 5-d,
    so the constant is no per-channel scale of the 4-d sum (fold_into_sum must not fold it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv(3, 4, 3, padding=1), conv(3, 4, 1)
        self.bn_a, self.bn_b = BN2(4), BN2(4)
        self.gamma = nn.Parameter(torch.rand(1, 1, 1, 1, 1) + 0.5)

    def forward(self, x):
        return self.gamma * (self.bn_a(self.a(x)) + self.bn_b(self.b(x.flip(2))))


class ScaledChannelsLastLinear(nn.Module):
    """permute → Linear → permute back, times a 5-d layer scale: 5-d out, not a fold."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.gamma = nn.Parameter(torch.rand(1, 1, 4, 1, 1) + 0.5)

    def forward(self, x):
        return self.gamma * self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("with_inputs", [True, False], ids=["inputs", "no-inputs"])
@pytest.mark.parametrize("make, rule", [(ScaledSum, "fold_into_sum"), (ScaledChannelsLastLinear, "fold_through_permute")])
def test_constant_of_higher_rank_is_not_folded(make, rule, with_inputs):
    model, x = randomize(make(), seed=0).eval(), torch.randn(2, 3, 5, 7)
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    assert_equivalent(model, fused, x)
    assert not report.faults, str(report)
    assert not any(r.rule == rule for r in report.rewrites), str(report)
