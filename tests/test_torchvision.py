"""Plain CNNs stay plain: torchvision's ResNet-18/50 and MobileNetV3 (no weights) lose their BNs
into the preceding convs and nothing else; residual sums whose terms read different tensors are
never merged. Equivalence is checked with random BN statistics."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples`

import reparam  # noqa: E402
from examples.blocks import randomize_norms  # noqa: E402
from reparam.testing import assert_equivalent  # noqa: E402

# Merges other than conv→BN that are exact and cheaper: MobileNetV3-small's stride-2 block 1 has
# no residual, so its linear 1×1 projection (16→16) feeds block 2's 1×1 expansion (16→72)
# directly: one 1×1 conv, fewer MACs. Any other such merge fails the test.
EXTRA_MERGES = {
    "mobilenet_v3_small": {"features.1.block.2.0 → features.2.block.0.0"},
}


def fused_and_report(name):
    model = randomize_norms(getattr(torchvision.models, name)(weights=None)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fused, report = reparam.fuse_with_report(model, (x,))
    return model, x, fused, report


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"])
def test_only_conv_bn_is_fused(name):
    model, x, fused, report = fused_and_report(name)
    assert_equivalent(model, fused, x)
    modules = dict(model.named_modules())
    extra = set()
    for r in report.rewrites:
        if r.rule == "remove_identity":  # eval-mode Dropout
            continue
        assert r.rule == "merge_sequential", str(report)
        _, second = r.detail.split(" → ")
        if not isinstance(modules.get(second), nn.BatchNorm2d):  # the first is a conv, or one made of convs
            extra.add(r.detail)
    assert extra == EXTRA_MERGES.get(name, set()), str(report)
    assert report.after.bns == 0
    assert report.after.convs == report.before.convs - len(extra)
    assert report.after.macs <= report.before.macs


class DifferentInputs(nn.Module):
    """conv_a(x) + conv_b(relu(x)): the terms read different tensors."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(torch.relu(x)))


class TwoArguments(nn.Module):
    """conv_a(x) + conv_b(y) + x: two inputs of the forward."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, y):
        return self.conv_a(x) + self.conv_b(y) + x


class BasicBlock(nn.Module):
    """ResNet's residual: relu(x + BN(conv(relu(BN(conv(x)))))); the identity and the convs
    read different tensors once the first ReLU sits between them."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("cls, n_inputs, convs", [(DifferentInputs, 1, 2), (TwoArguments, 2, 2), (BasicBlock, 1, 2)])
def test_sums_of_different_inputs_are_not_merged(cls, n_inputs, convs):
    model = randomize_norms(cls()).eval()
    xs = tuple(torch.randn(2, 4, 7, 7) for _ in range(n_inputs))
    fused = reparam.fuse(model, xs)
    assert_equivalent(model, fused, *xs)
    stats = reparam.count(fused, xs)
    assert (stats.convs, stats.bns) == (convs, 0)
