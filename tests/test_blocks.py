"""The training-form blocks of examples/blocks: for random channels, strides, groups and kernel
sizes, `reparam.fuse` gives exactly one convolution followed by the block's activation, no
BatchNorm, and the same function (rel. error ≤ 1e-5 in float32, 1e-10 in float64)."""
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples`

import reparam  # noqa: E402
from examples.blocks import BLOCKS, DepthConcat  # noqa: E402
from reparam.testing import assert_equivalent  # noqa: E402
from strategies import Block, cases, counts, fuse_checked, inputs, randomize  # noqa: E402


@st.composite
def blocks(draw, cls):
    """`cls` with drawn groups, channels per group, stride and kernel size (3 or 5)."""
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    cin = groups * draw(st.integers(1, 4))
    cout = cin if draw(st.booleans()) else groups * draw(st.integers(1, 4))  # identity branches need cin == cout
    if draw(st.booleans()) and cin == cout:
        groups = cin  # depthwise, as MobileOne and DBB use it
    stride = draw(st.sampled_from([1, 1, 2]))
    kernel_size = draw(st.sampled_from([3, 3, 5]))
    return Block(cls(cin, cout, stride=stride, groups=groups, kernel_size=kernel_size), cin)


def computations(gm: fx.GraphModule) -> list:
    """The nodes that compute something, in order: module types or function names. A block
    whose merges all lie inside one child keeps its own Python code (reparam.fuse's rule), whose
    glue (a cat of one tensor, say) is not counted: its layers, in order, instead."""
    if not isinstance(gm, fx.GraphModule):
        return [type(m) for m in gm.modules() if not list(m.children())]
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(gm.get_submodule(n.target)))
        elif n.op in ("call_function", "call_method"):
            out.append(getattr(n.target, "__name__", n.target))
    return out


@pytest.mark.parametrize("name", sorted(set(BLOCKS) - {"dbb_concat"}))
def test_block_fuses_to_one_conv_and_its_activation(name):
    @given(cases(blocks(BLOCKS[name])))
    def check(case):
        fused, _ = fuse_checked(case)
        assert counts(fused, case.x) == (1, 0)
        assert computations(fused) == [nn.Conv2d, nn.ReLU]

    check()


@given(cases(blocks(DepthConcat)))
def test_depth_concat_fuses_when_it_costs_nothing_more(case):
    """DBB transform IV. With groups > 1 the merged conv would be dense: left alone, and said
    so, unless the cost guard is off (max_macs_ratio=inf)."""
    fused, report = fuse_checked(case)
    convs = [b[0] for b in case.model.branches]
    if convs[0].groups == 1 or len(convs) == 1 or case.max_macs_ratio == float("inf"):
        assert counts(fused, case.x) == (1, 0)
        assert computations(fused) == [nn.Conv2d, nn.ReLU]
    else:
        assert counts(fused, case.x) == (len(convs), 0)
        assert any(s.rule == "merge_concat" and "cost" in s.reason for s in report.skipped), str(report)


@pytest.mark.parametrize("name, stride, groups", [
    ("repvgg", 1, 1), ("repvgg", 2, 1), ("repvgg", 1, 4), ("repvgg", 2, 2),
    ("acnet", 1, 1), ("mobileone", 1, 8), ("dbb", 1, 1), ("dbb", 2, 2),
])
def test_named_configurations(name, stride, groups):
    """The configurations the issue names (RepVGG stride 1/2 with groups, depthwise MobileOne...)."""
    model = randomize(BLOCKS[name](8, 8, stride=stride, groups=groups), seed=0).eval()
    x = inputs((2, 8, 11, 11), seed=0)
    fused, report = reparam.fuse_with_report(model)
    assert_equivalent(model, fused, x)
    assert counts(fused, x) == (1, 0), str(report)
    assert computations(fused) == [nn.Conv2d, nn.ReLU]
