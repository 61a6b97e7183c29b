"""reparam.summary: rewrites grouped by multi-branch block (dominators on the fx graph), named
shapes, deployment health."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples`

import reparam  # noqa: E402
from examples.blocks import DiverseBranchBlock, RepVGGBlock, randomize_norms  # noqa: E402
from gcnet.blocks import GCBlock  # noqa: E402
from reparam.summary import Counts, block_scopes, group_by_block, health, int8_error, named_shape  # noqa: E402


class Stack(nn.Module):
    """stem conv-BN, then two blocks of one kind: the blocks' rewrites must group apart from the stem's."""

    def __init__(self, block):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(block(8, 8), block(8, 8))

    def forward(self, x):
        return self.blocks(self.stem(x))


def fused_report(model, size=8):
    model = randomize_norms(model, seed=0).eval()
    fused, report = reparam.fuse_with_report(model, (torch.randn(1, 3, size, size),))
    return model, fused, report


@pytest.mark.parametrize("block", [RepVGGBlock, DiverseBranchBlock, GCBlock], ids=lambda b: b.__name__)
def test_each_block_is_one_line_and_the_stem_another(block):
    model, fused, report = fused_report(Stack(block))
    assert block_scopes(model) == {"blocks.0", "blocks.1"}
    groups = group_by_block(model, fused, report.rewrites)
    by_path = {g.path: g for g in groups}
    assert set(by_path) == {"stem", "blocks.0", "blocks.1"}
    assert sum(len(g.rewrites) for g in groups) == len(report.rewrites)  # every rewrite once
    for name in ("blocks.0", "blocks.1"):
        g = by_path[name]
        before = [m for n, m in model.named_modules() if n.startswith(name + ".")]
        assert g.is_block and g.kind == block.__name__
        assert g.before == Counts(sum(isinstance(m, nn.Conv2d) for m in before),
                                  sum(isinstance(m, nn.BatchNorm2d) for m in before), 0)
        assert g.after == Counts(1, 0, 0)
        assert g.line() == f"{name} ({block.__name__}): {g.before} → 1 conv 3×3, 8→8"
    assert not by_path["stem"].is_block


def test_a_lone_block_is_the_model():
    model, fused, report = fused_report(nn.Sequential(GCBlock(3, 3)))
    [group] = group_by_block(model, fused, report.rewrites)
    assert group.is_block and group.line().startswith("0 (GCBlock): ")


def test_a_block_whose_input_feeds_another_branch_is_still_found():
    """GCNet's first semantic and detail blocks read the same tensor: the fork's post-dominator is
    far away, the join's dominator is the block's input."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = RepVGGBlock(3, 3), RepVGGBlock(3, 3)

        def forward(self, x):
            return self.a(x) * self.b(x)

    model = TwoHeads().eval()
    assert block_scopes(model) == {"", "a", "b"}  # the model itself is one region: a fork joined by `*`
    assert {g.path for g in group_by_block(model, model, [])} == set()


def test_untraceable_models_group_by_parent_module():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = RepVGGBlock(3, 3)

        def forward(self, x):
            return self.block(x) if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace

    model, fused, report = fused_report(Branchy())
    assert block_scopes(model) == set()
    groups = group_by_block(model, fused, report.rewrites)
    assert groups and not any(g.is_block for g in groups)
    assert sum(len(g.rewrites) for g in groups) == len(report.rewrites)


def test_linear_layers_are_counted_apart_from_convs():
    model, fused, report = fused_report(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(),
                                                      nn.Linear(4 * 64, 5), nn.BatchNorm1d(5)))
    assert Counts(1, 2, 1) == reparam.summary.counts(model, "")
    assert str(Counts(1, 2, 1)) == "1 conv + 2 BNs + 1 linear"


def test_named_shapes():
    assert named_shape("Conv2d(64, 3, 7, 7)") == "Conv2d out 64, in 3, k 7×7"
    assert named_shape("ConvTranspose2d(3, 64, 4, 4)") == "ConvTranspose2d out 64, in 3, k 4×4"
    assert named_shape("Linear(10, 4)") == "Linear(10, 4)"


def test_health_sees_float16_overflow_and_subnormals_and_int8_error():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1e5, 1e-6]).reshape(2, 1, 1, 1))
    [h] = health(nn.Sequential(conv))
    assert h.max_abs == pytest.approx(1e5)
    assert (h.fp16_overflow, h.fp16_subnormal) == (0.5, 0.5)
    assert (h.bf16_overflow, h.bf16_subnormal) == (0.0, 0.0)
    assert h.int8_error == 0.0  # one weight per output channel: its own scale is exact
    assert 0 < int8_error(torch.tensor([[1.0, 0.3]])) < 1 / 127  # rounding to the channel's 1/127 steps
