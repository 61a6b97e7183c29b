"""Branches of one input, summed: any aligned mix of convs, BNs and identities is one conv."""
import torch
from hypothesis import given
from hypothesis import strategies as st
from reparam.nn import ChannelAffine
from strategies import (LOW_DTYPES, affine_after_sums, cases, check_low_precision, counts, fuse_checked,
                        fuses_to_one_conv, identity_bn, nested_sums, parallel_sums, repvgg)


@given(cases(parallel_sums()))
def test_aligned_branches_sum_to_one_conv(case):
    fuses_to_one_conv(case)


@given(cases(repvgg()))
def test_repvgg_block_is_one_conv(case):
    fuses_to_one_conv(case, guard_may_refuse=False)


@given(cases(identity_bn()))
def test_identity_plus_bn_is_one_per_channel_affine_not_a_conv(case):
    """x + BN(x) holds no convolution: it becomes one ChannelAffine (a conv would cost more)."""
    fused, report = fuse_checked(case)
    assert counts(fused, case.x) == (0, 0), str(report)
    ops = [n for n in fused.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert len(ops) == 1 and isinstance(fused.get_submodule(ops[0].target), ChannelAffine), fused.code


@given(cases(nested_sums()))
def test_sum_of_sums_is_one_conv(case):
    fuses_to_one_conv(case)


@given(cases(parallel_sums(kinds=["conv", "bn", "identity"]), dtypes=[torch.float32], with_inputs=False),
       st.sampled_from(LOW_DTYPES))
def test_parallel_sum_in_low_precision_keeps_dtype_and_accuracy(case, dtype):
    check_low_precision(case, dtype)


@given(cases(affine_after_sums()))
def test_affine_after_a_sum_of_convs_of_different_tensors_folds_into_them(case):
    fused, report = fuse_checked(case)
    n = len(case.model.convs)
    assert counts(fused, case.x) == (n, 0), str(report)
    assert any(r.rule == "fold_into_sum" for r in report.rewrites), str(report)
