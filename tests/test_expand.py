"""reparam.expand: conv → BN pairs of plain networks become training blocks, and reparam.fuse
collapses them back to the plain network's convs.

Properties over random plain networks (k in {1, 3, 5}, stride 1/2, padding k // 2 or less,
dilation, groups incl. depthwise, residual connections), for every recipe:
  * preserve_function: the expanded model computes the model's eval function at expansion;
  * the round trip: fuse(expand(m)) runs as many convs as fuse(m), with the same kernels, and
    computes the expanded model's function (random weights and BN statistics everywhere).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import reparam
from reparam.expand import RECIPES, Branches
from reparam.testing import rel_error
from strategies import check_equivalent, inputs, randomize, seeds


# ---- random plain networks ----

class ConvBNAct(nn.Sequential):
    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


class Residual(nn.Module):
    """relu(x + BN(conv(relu(BN(conv(x))))))."""

    def __init__(self, a: nn.Conv2d, b: nn.Conv2d):
        super().__init__()
        self.a, self.bn_a, self.b, self.bn_b = a, nn.BatchNorm2d(a.out_channels), b, nn.BatchNorm2d(b.out_channels)

    def forward(self, x):
        return torch.relu(x + self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))


class Plain(nn.Sequential):
    """Layers, then a global average (so the output does not depend on where the net ends)."""


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_layers(draw, cin, size, same=False):
    """(an nn.Conv2d reading cin channels of a size×size input, its output size): groups among
    the divisors of cin (depthwise included), k in {1, 3, 5}, padding k // 2 or less, stride
    1 or 2, dilation 1 or 2; `same`: shape-preserving (a residual branch)."""
    groups = draw(st.sampled_from(_divisors(cin) + [cin]))
    cout = cin if same else groups * draw(st.integers(1, max(1, 6 // groups)))
    k = draw(st.sampled_from([1, 3, 5]))
    d = 1 if same or k == 1 else draw(st.sampled_from([1, 1, 2]))
    p = d * (k // 2) if same else draw(st.sampled_from([d * (k // 2), d * (k // 2), 0]))
    s = 1 if same else draw(st.sampled_from([1, 2]))
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 2:  # too small for this input: keep the size
        p, s, out = d * (k // 2), 1, size
    return nn.Conv2d(cin, cout, k, s, p, d, groups, bias=draw(st.booleans())), out


@st.composite
def plain_nets(draw):
    """(model in eval mode with random weights and BN statistics, input (2, C, H, H))."""
    size = first = draw(st.integers(6, 12))
    c = cin = draw(st.integers(1, 4))
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            conv, size = draw(conv_layers(c, size))
            layers.append(ConvBNAct(conv))
            c = conv.out_channels
        else:
            layers.append(Residual(draw(conv_layers(c, size, same=True))[0], draw(conv_layers(c, size, same=True))[0]))
    seed = draw(seeds)
    model = randomize(Plain(*layers), seed).eval()
    note(repr(model))
    return model, inputs((2, cin, first, first), seed)


def _eligible(model: nn.Module, recipe: str) -> int:
    """How many of a plain net's conv → BN pairs the recipe expands by default: k > 1, and for
    dbb (whose average pool cannot be dilated) dilation 1."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1
               and (recipe != "dbb" or m.dilation == (1, 1)))


class _Convs(TorchDispatchMode):
    """The convolutions one forward runs: (weight shape, stride, padding, dilation, groups)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ == "convolution":
            self.seen.append((tuple(args[1].shape), *map(tuple, args[3:6]), args[8]))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def conv_kernels(model, x) -> list:
    counter = _Convs()
    with counter:
        model(x)
    return sorted(counter.seen)


# ---- the properties ----

@pytest.mark.parametrize("recipe", sorted(RECIPES))
@given(net=plain_nets())
def test_expanded_model_computes_the_original_function(recipe, net):
    model, x = net
    expanded, report = reparam.expand_with_report(model, recipe, example_inputs=(x,))
    note(str(report))
    assert len(report.expanded) == _eligible(model, recipe)
    assert report.max_rel_error <= 1e-5
    assert rel_error(model(x), expanded.eval()(x)) <= 1e-5


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@given(net=plain_nets(), seed=seeds)
def test_fuse_of_expanded_runs_the_plain_convs_and_the_expanded_function(recipe, net, seed):
    model, x = net
    expanded = randomize(reparam.expand(model, recipe), seed).eval()  # every branch non-trivial
    fused, report = reparam.fuse_with_report(expanded, (x,))
    note(str(report))
    assert conv_kernels(fused, x) == conv_kernels(reparam.fuse(model, (x,)), x)
    assert reparam.count(fused, (x,)).bns == 0
    check_equivalent(expanded, fused, x, 1e-5)
