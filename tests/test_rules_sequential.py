"""One op after another: each composition the rules call exact becomes one conv, with the same outputs."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies import (LOW_DTYPES, bn_unpadded_conv, cases, chains, check_low_precision, conv_bn,
                        conv_bn_any_rank, conv_pointwise, dbb_1x1_bnpad_kxk, fuses_to_one_conv,
                        pointwise_pointwise, pointwise_then_kxk)


@given(cases(conv_bn()))
def test_conv_then_bn_is_one_conv(case):
    fuses_to_one_conv(case, guard_may_refuse=False)


@given(cases(conv_bn_any_rank(), max_size=6))
def test_conv_then_bn_is_one_conv_in_1d_and_3d(case):
    fuses_to_one_conv(case, guard_may_refuse=False)


@given(cases(bn_unpadded_conv()))
def test_bn_then_unpadded_conv_is_one_conv(case):
    fuses_to_one_conv(case, guard_may_refuse=False)


@given(cases(conv_pointwise()))
def test_conv_then_unpadded_1x1_is_one_conv(case):
    fuses_to_one_conv(case)


@given(cases(pointwise_pointwise()))
def test_strided_1x1_then_1x1_is_one_conv(case):
    fuses_to_one_conv(case)


@given(cases(pointwise_then_kxk()))
def test_1x1_then_kxk_is_one_conv_where_the_border_allows(case):
    fuses_to_one_conv(case)


@given(cases(dbb_1x1_bnpad_kxk()))
def test_1x1_bnandpad_kxk_is_one_padded_conv(case):
    fuses_to_one_conv(case)


@given(cases(chains()))
def test_exact_chain_is_one_conv(case):
    fuses_to_one_conv(case)


@given(cases(conv_bn(), dtypes=[torch.float32], with_inputs=False), st.sampled_from(LOW_DTYPES))
def test_conv_then_bn_in_low_precision_keeps_dtype_and_accuracy(case, dtype):
    check_low_precision(case, dtype)
