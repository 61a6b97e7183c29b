"""The helper rules: AvgPool as a depthwise conv, multiplication by constants, channel concat,
eval-mode Dropout/Identity removal, Linear → BatchNorm1d."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import reparam
from reparam.testing import assert_equivalent

from strategies import (Cat, cases, concats, counts, dbb_pool_branch, fuse_checked, fuses_to_one_conv, identity_plus_pool,
                        linear_bn, pointwise_then_pool, scaled_branches, scaled_convs, sum_with_pool,
                        randomize, skipped, with_identities)


# ---- AvgPool ----

@given(cases(sum_with_pool()))
def test_pool_branch_merges_into_the_sum(case):
    fuses_to_one_conv(case, nothing_else=True)


@given(cases(pointwise_then_pool()))
def test_bias_free_1x1_then_pool_is_one_conv(case):
    fuses_to_one_conv(case, nothing_else=True)


@given(cases(dbb_pool_branch()))
def test_dbb_pool_branch_is_one_conv(case):
    fuses_to_one_conv(case, nothing_else=True)


@given(cases(identity_plus_pool(), with_inputs=True))
def test_identity_plus_pool_is_left_alone_rather_than_become_a_conv(case):
    """x + AvgPool(x) is exactly a depthwise conv, but running it as one adds a conv."""
    fused, report = fuse_checked(case)
    assert counts(fused, case.x) == counts(case.model, case.x) == (0, 0)
    assert skipped(report, "would run one more"), str(report)


# ---- multiplication by a constant or a per-channel parameter ----

@given(cases(scaled_convs()))
def test_scaled_conv_is_one_conv(case):
    fuses_to_one_conv(case, guard_may_refuse=False, nothing_else=True, single_chain=True)


@given(cases(scaled_branches()))
def test_sum_of_scaled_branches_is_one_conv(case):
    fuses_to_one_conv(case, nothing_else=True)


# ---- concat ----

@given(cases(concats(dims=(-3,))) | cases(concats(dims=(1,)), with_inputs=True))
def test_concat_of_aligned_branches_is_one_conv(case):
    fuses_to_one_conv(case, nothing_else=True)


@given(cases(concats(dims=(1,)), with_inputs=False))
def test_concat_along_dim_1_is_channels_only_where_the_input_is_known_batched(case):
    """cat(dim=1) is a channel concat of (N, C, H, W), not of an unbatched (C, H, W). Without
    example inputs it merges only where the model shows the input is batched (a BatchNorm2d on
    the way), else it is refused and the report says why."""
    fused, report = fuse_checked(case)
    given = reparam.fuse(case.model, (case.x,), max_macs_ratio=case.max_macs_ratio)
    if counts(fused, case.x)[0] > counts(given, case.x)[0]:
        assert skipped(report, "only if the input is batched"), str(report)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in case.model.modules())


def test_concat_of_an_unbatched_input_along_dim_1_is_not_channels():
    model = randomize(Cat([nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)], [0, 1], 1), 0).eval()
    x = torch.randn(3, 7, 9)  # (C, H, W): dim 1 is the height
    fused, report = reparam.fuse_with_report(model, (x,))
    assert_equivalent(model, fused, x)
    assert counts(fused, x) == (2, 0) and skipped(report, "not channels"), str(report)


class ScaledUnbatched(nn.Module):
    """conv → times a (1, 1, 1, 1) parameter → sum(0) → conv (fuzz): on an unbatched (C, H, W)
    input the 4-d constant makes the product 4-d, and sum(0) then sums it away."""

    def __init__(self):
        super().__init__()
        self.a, self.p, self.b = nn.Conv2d(4, 2, 1, bias=False), nn.Parameter(torch.randn(1, 1, 1, 1)), nn.Conv2d(2, 5, 1)

    def forward(self, x):
        return self.b((self.a(x) * self.p).sum(0))


def test_a_4d_constant_on_a_conv_of_unknown_rank_is_not_a_per_channel_scale():
    model, x = randomize(ScaledUnbatched(), 0).eval(), torch.randn(4, 3, 8)
    fused, report = reparam.fuse_with_report(model)  # was: folded, then the model fails on x
    assert_equivalent(model, fused, x)
    assert skipped(report, "rank is unknown"), str(report)


class UniformAffine(nn.Module):
    """A sum of scalar multiples of one unbatched (C, H, W) value (fuzz): merged without a conv
    it is one affine, whose values are the same for every channel."""

    def __init__(self, style):
        super().__init__()
        self.style, self.conv = style, nn.Conv2d(2, 2, 3, padding=1)
        self.register_buffer("d", torch.full((1, 1, 1), 0.5))

    def forward(self, x):
        v = F.relu(x + F.avg_pool2d(x, 3, 1, 1))
        v = torch.mul(v, 1.5) - v if self.style == "scalars" else v + v * self.d
        return self.conv(v)


@pytest.mark.parametrize("style", ["scalars", "ones-shaped-buffer"])
def test_a_uniform_affine_of_an_unbatched_value_holds_for_other_sizes(style):
    model, x = randomize(UniformAffine(style), 0).eval(), torch.randn(2, 8, 6)
    fused = reparam.fuse(model, (x,))  # was: an affine of 8 "channels" (the height), then a crash
    assert_equivalent(model, fused, torch.randn(2, 10, 7))


# ---- eval-mode Dropout / Identity ----

@given(cases(with_identities()))
def test_eval_dropout_and_identity_disappear(case):
    fuses_to_one_conv(case, guard_may_refuse=False, nothing_else=True, single_chain=True)


# ---- Linear → BatchNorm1d ----

@given(cases(linear_bn(), with_inputs=True))
def test_linear_and_bn1d_on_2d_input_are_one_linear(case):
    fuses_to_one_conv(case, guard_may_refuse=False)
