"""One op after another: each composition the rules call exact becomes one conv, with the same outputs."""
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam.testing import assert_equivalent

from strategies import (LOW_DTYPES, bn_unpadded_conv, cases, chains, check_low_precision, conv_bn,
                        conv_bn_any_rank, conv_pointwise, counts, dbb_1x1_bnpad_kxk, fuse_checked,
                        fuses_to_one_conv, inputs, linear_norms, pointwise_pointwise, pointwise_then_kxk, randomize,
                        skipped)


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


@given(cases(linear_norms()))
def test_linear_then_bn1d_through_flatten_and_reshape_is_one_linear(case):
    """LeViT's LinearNorm: with example inputs one Linear and nothing else; without, the
    rank is unknown and the report says so."""
    fused, report = fuse_checked(case)
    if case.with_inputs:
        assert counts(fused, case.x) == (1, 0), str(report)
        assert [n.op for n in fused.graph.nodes] == ["placeholder", "call_module", "output"], fused.code
    else:
        assert counts(fused, case.x) == (1, 1)
        assert skipped(report, "rank unknown"), str(report)


def test_chain_rewritten_below_a_node_is_judged_on_its_new_input():
    """A chain of four convs: after the first two merges, the last conv's cached linear view
    must read the new conv, not the erased one (that once read as 'also used elsewhere: 0 ops')."""
    model = randomize(nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.Conv2d(3, 6, 1, groups=3, bias=False),
                                    nn.Conv2d(6, 1, 1, bias=False), nn.Conv2d(1, 2, 1, bias=False)), 0).eval()
    x = inputs((2, 1, 5, 5), 0)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert_equivalent(model, fused, x)
    assert [s.reason for s in report.skipped] == \
        ["exact, but the merged conv would cost 18 MACs per output position instead of 11"]
