"""The helper rules: AvgPool as a depthwise conv, multiplication by constants, channel concat,
eval-mode Dropout/Identity removal, Linear → BatchNorm1d."""
from hypothesis import given

from strategies import (cases, concats, counts, dbb_pool_branch, fuse_checked, fuses_to_one_conv, identity_plus_pool,
                        linear_bn, pointwise_then_pool, scaled_branches, scaled_convs, sum_with_pool,
                        skipped, with_identities)


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
    fuses_to_one_conv(case, guard_may_refuse=False, nothing_else=True)


@given(cases(scaled_branches()))
def test_sum_of_scaled_branches_is_one_conv(case):
    fuses_to_one_conv(case, nothing_else=True)


# ---- concat ----

@given(cases(concats()))
def test_concat_of_aligned_branches_is_one_conv(case):
    fuses_to_one_conv(case, nothing_else=True)


# ---- eval-mode Dropout / Identity ----

@given(cases(with_identities()))
def test_eval_dropout_and_identity_disappear(case):
    fuses_to_one_conv(case, guard_may_refuse=False, nothing_else=True)


# ---- Linear → BatchNorm1d ----

@given(cases(linear_bn(), with_inputs=True))
def test_linear_and_bn1d_on_2d_input_are_one_linear(case):
    fuses_to_one_conv(case, guard_may_refuse=False)
