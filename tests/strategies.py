"""Strategies that build valid re-parameterizable blocks by construction, and the modules that wire them.

Groups are drawn first, then channels per group, so every conv is valid. Branches of a sum or
concat share a centre offset per axis (2·padding − dilation·(k − 1)), from which each branch's
padding follows, so their outputs line up whatever their kernel size or dilation. Weights, BN
statistics and inputs come from a `torch.Generator` seeded with a drawn seed, never from global
randomness, and BN statistics are random so that no BN is the identity.

A block strategy draws a `Block` (module, input channels, spatial rank); `cases` adds a seed,
dtype and input shape and gives a `Case` (hypothesis prints the model's repr on failure).
"""
from __future__ import annotations

import copy
import functools
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import assume, note
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_leaves

import reparam
from reparam.nn import BNAndPad, ChannelAffine
from reparam.stats import _BN_OPS, _OpCounter
from reparam.testing import rel_error

KERNELS = [(1, 1), (3, 3), (5, 5), (1, 3), (3, 1)]
KERNELS_ND = {1: [(1,), (3,), (5,)], 2: KERNELS, 3: [(1, 1, 1), (3, 3, 3), (1, 3, 3), (3, 1, 1)]}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
DTYPES = [torch.float32, torch.float64]
# relative to the output's largest magnitude (reparam.testing.rel_error)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Low precision: the fused fp16/bf16 model against the float32 model with the same (rounded)
# weights and input. 8 unit roundoffs: the fused weights are rounded once from float64, the
# output once, and CPU kernels accumulate in float32. Measured: at most 3.4 u (fp16) and
# 2.2 u (bf16) over 150 random parallel sums.
LOWP_TOL = {torch.float16: 8 * 2.0**-11, torch.bfloat16: 8 * 2.0**-8}


def _cpu_convolves(dtype) -> bool:
    try:
        F.conv2d(torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 3, 3, dtype=dtype), padding=1)
        F.batch_norm(torch.ones(1, 2, 1, 1, dtype=dtype), torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype))
        return True
    except RuntimeError:
        return False


LOW_DTYPES = [d for d in (torch.float16, torch.bfloat16) if _cpu_convolves(d)]  # both on torch 2.14

seeds = st.integers(0, 2**32 - 1)


@dataclass
class Block:
    """A module to fuse, what its input looks like, and (for blocks a rule must refuse) the
    substring of the reason the report must give; `size` fixes the input's spatial size."""
    module: nn.Module
    in_channels: int
    nd: int = 2
    size: tuple[int, ...] | None = None
    reason: str = ""


# ---- layers ----

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def channels(draw, cin=None, cout=None, groups=None):
    """(groups, cin, cout): groups first, then channels per group; fixed counts constrain groups.

    With both counts free, one input channel per group (depthwise) is as likely as 2 or 3."""
    if groups is None:
        if cin is None and cout is None:
            groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
        else:
            groups = draw(st.sampled_from(_divisors(math.gcd(cin or 0, cout or 0))))
    cin = cin or groups * draw(st.integers(1, 3))
    cout = cout or groups * draw(st.integers(1, 3))
    return groups, cin, cout


def _padding_for(offset: int, k: int, d: int) -> int | None:
    """The padding giving centre offset `offset` (2p − d(k − 1)) to a kernel k dilated d, if any."""
    twice = offset + d * (k - 1)
    return twice // 2 if twice >= 0 and twice % 2 == 0 else None


@st.composite
def convs(draw, cin=None, cout=None, *, nd=2, kernels=None, stride=None, strides=(1, 2),
          offset=None, max_padding=2, dilations=(1, 2), groups=None, bias=None,
          padding_mode="zeros"):
    """An nn.Conv{nd}d valid by construction.

    stride: a fixed per-axis tuple, else drawn per axis from `strides`.
    offset: the per-axis centre offset 2p − d(k − 1) (0 is 'same' padding); kernels that cannot
    reach it are not drawn. None draws any padding in 0..max_padding per axis."""
    groups, cin, cout = draw(channels(cin, cout, groups))
    dil = tuple(draw(st.sampled_from(dilations)) for _ in range(nd))
    options = kernels or KERNELS_ND[nd]
    if offset is not None:
        options = [k for k in options
                   if all(_padding_for(offset, kk, dd) is not None for kk, dd in zip(k, dil))]
        assume(options)
    kernel = draw(st.sampled_from(options))
    if offset is None:
        pad = tuple(draw(st.integers(0, max_padding)) for _ in range(nd))
    else:
        pad = tuple(_padding_for(offset, k, d) for k, d in zip(kernel, dil))
    stride = stride or tuple(draw(st.sampled_from(strides)) for _ in range(nd))
    bias = draw(st.booleans()) if bias is None else bias
    return CONV[nd](cin, cout, kernel, stride, pad, dil, groups, bias=bias, padding_mode=padding_mode)


@st.composite
def bns(draw, c, nd=2, affine=None):
    """A BatchNorm with drawn eps and affine; `randomize` gives it random statistics."""
    affine = draw(st.booleans()) if affine is None else affine
    return BN[nd](c, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])), affine=affine)


@st.composite
def identities(draw):
    """What eval mode turns into the identity: dropout of any kind, nn.Identity."""
    return draw(st.sampled_from([nn.Identity(), nn.Dropout(0.5), nn.Dropout2d(0.3),
                                 FunctionalDropout(0.2)]))


# ---- wiring ----

SUM_STYLES = ("plus", "radd", "iadd", "torch.add", "sum", "sub", "tree")


class Branches(nn.Module):
    """Branches of one input; `order` lists the terms, -1 being the bare input x."""

    def __init__(self, branches: list[nn.Module], order: list[int], how):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.order, self.how = order, how

    def extra_repr(self):
        return f"order={self.order}, {self.__class__.__name__.lower()}={self.how!r}"

    def terms(self, x) -> list:
        return [x if i < 0 else self.branches[i](x) for i in self.order]


class Sum(Branches):
    """The terms summed in style `how`: plus: a + b + c; radd: c + (b + a); iadd: y = a; y += b;
    torch.add; sum: sum([...]) (starts at a literal 0); sub: a - b - c; tree: (a + b) + (c + d)."""

    def forward(self, x):
        terms = self.terms(x)
        if self.how == "sum":
            return sum(terms)
        if self.how == "iadd":  # the first term is a fresh tensor (see parallel_sums)
            y = terms[0]
            for t in terms[1:]:
                y += t
            return y
        if self.how == "tree":
            while len(terms) > 1:
                terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) // 2 * 2:]
            return terms[0]
        op = {"plus": operator.add, "radd": lambda y, t: t + y, "torch.add": torch.add,
              "sub": operator.sub}[self.how]
        return functools.reduce(op, terms)


class Cat(Branches):
    """The terms concatenated along dim `how`."""

    def forward(self, x):
        return torch.cat(self.terms(x), dim=self.how)


class Scale(nn.Module):
    """body(x) times a constant or a per-channel parameter, written as `style`.

    mul: y * c; rmul: c * y; div: y / c; neg: -y; torch.mul; param: y * p with p of `shape`
    (per channel, e.g. (1, C, 1, 1) or (C, 1, 1)); rparam: p * y."""

    STYLES = ("mul", "rmul", "div", "neg", "torch.mul", "param", "rparam")

    def __init__(self, body: nn.Module, style: str, value: float = 1.0, shape: tuple = ()):
        super().__init__()
        self.body, self.style, self.value = body, style, value
        self.p = nn.Parameter(torch.ones(shape)) if style in ("param", "rparam") else None

    def extra_repr(self):
        return f"style={self.style!r}, value={self.value}"

    def forward(self, x):
        y = self.body(x)
        s = self.style
        if s == "mul":
            return y * self.value
        if s == "rmul":
            return self.value * y
        if s == "div":
            return y / self.value
        if s == "neg":
            return -y
        if s == "torch.mul":
            return torch.mul(y, self.value)
        return y * self.p if s == "param" else self.p * y


class FunctionalDropout(nn.Module):
    """F.dropout(x, p, training=self.training): the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training)


class AvgPoolFn(nn.Module):
    """F.avg_pool2d called in forward rather than an nn.AvgPool2d module."""

    def __init__(self, kernel, stride, padding, count_include_pad=True):
        super().__init__()
        self.args = (kernel, stride, padding, False, count_include_pad)

    def extra_repr(self):
        return "kernel, stride, padding, ceil_mode, count_include_pad = " + repr(self.args)

    def forward(self, x):
        return F.avg_pool2d(x, *self.args)


# ---- branches of one input ----

@st.composite
def avg_pools(draw, k, stride, padding, count_include_pad=True):
    """An average pool as a module or as an F.avg_pool2d call."""
    if draw(st.booleans()):
        return AvgPoolFn(k, stride, padding, count_include_pad)
    return nn.AvgPool2d(k, stride, padding, count_include_pad=count_include_pad)


@st.composite
def branches(draw, cin, cout, stride, offset, kinds=None):
    """One branch (cin → cout, `stride`, centre `offset`) of a sum or concat, or None for the
    bare input. Kinds: conv[-BN], BN, identity, avgpool[-BN], DBB's 1×1 → BNAndPad → k×k[-BN]
    and 1×1 → BNAndPad → avgpool → BN. Kinds that cannot meet the constraints are not drawn."""
    same = cin == cout and stride == (1, 1) and offset == 0
    squares = [k for k in (1, 3, 5) if _padding_for(offset, k, 1) is not None]
    pools = [k for k in squares if 2 * _padding_for(offset, k, 1) <= k]  # torch: pad ≤ kernel / 2
    allowed = ["conv", "conv"] + (["bn", "identity"] if same else []) \
        + (["avg"] if cin == cout and pools else []) + (["dbb_avg", "dbb_1x1_kxk"] if squares else [])
    kind = draw(st.sampled_from([k for k in allowed if kinds is None or k in kinds] or ["conv"]))
    if kind == "conv":
        conv = draw(convs(cin, cout, stride=stride, offset=offset))
        return nn.Sequential(conv, draw(bns(cout))) if draw(st.booleans()) else conv
    if kind == "bn":
        return draw(bns(cin))
    if kind == "identity":
        return draw(st.sampled_from([None, nn.Identity()]))
    if kind == "avg":
        k = draw(st.sampled_from(pools))
        pool = draw(avg_pools(k, stride, _padding_for(offset, k, 1)))
        return nn.Sequential(pool, draw(bns(cout))) if draw(st.booleans()) else pool
    k = draw(st.sampled_from(squares))
    p = _padding_for(offset, k, 1)
    groups, _, mid = draw(channels(cin, None if kind == "dbb_1x1_kxk" else cout))
    first = nn.Conv2d(cin, mid, 1, groups=groups, bias=False)
    if kind == "dbb_avg":
        return nn.Sequential(first, BNAndPad(mid, padding=p), nn.AvgPool2d(k, stride, 0), draw(bns(cout)))
    second = nn.Conv2d(mid, cout, k, stride, 0, groups=draw(st.sampled_from(_divisors(math.gcd(mid, cout)))),
                       bias=draw(st.booleans()))
    tail = [draw(bns(cout))] if draw(st.booleans()) else []
    return nn.Sequential(first, BNAndPad(mid, padding=p), second, *tail)


@st.composite
def aligned(draw, identity_ok=True):
    """(cin, cout, stride, offset) shared by the branches of a sum or concat."""
    _, cin, cout = draw(channels())
    if identity_ok and draw(st.booleans()):
        cout = cin
    stride = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2), (2, 1)]))
    offset = draw(st.sampled_from([0, 0, 0, -2, 2]))
    return cin, cout, stride, offset


def _carries_channels(b) -> bool:
    """A branch whose spec fixes the channel count (so identity and pool terms can be sized)."""
    return b is not None and not isinstance(b, (nn.Identity, nn.AvgPool2d, AvgPoolFn))


def wire(bs: list, order) -> tuple[list[nn.Module], list[int]]:
    """(modules, order) for Sum/Cat: the non-bare branches, and `order` indexing them (-1: x)."""
    keep = [i for i, b in enumerate(bs) if b is not None]
    index = {i: j for j, i in enumerate(keep)}
    return [bs[i] for i in keep], [index.get(i, -1) for i in order]


@st.composite
def parallel_sums(draw, n_min=2, n_max=4, styles=SUM_STYLES, kinds=None):
    """Block: 2–4 branches of one input, aligned, summed in a drawn style; at least one branch
    carries the channel count. Fuses to exactly one conv and no BN."""
    cin, cout, stride, offset = draw(aligned())
    n = draw(st.integers(n_min, n_max))
    bs = [draw(branches(cin, cout, stride, offset, kinds)) for _ in range(n)]
    assume(any(_carries_channels(b) for b in bs))
    style = draw(st.sampled_from(styles))
    order = draw(st.permutations(range(n)))
    if style == "iadd":  # `y += t` on the input itself would change the caller's tensor
        first = next(i for i in order if _carries_channels(bs[i]))
        order = [first] + [i for i in order if i != first]
    mods, order = wire(bs, order)
    return Block(Sum(mods, order, style), cin)


@st.composite
def concats(draw, n_min=2, n_max=4, dims=(1, -3)):
    """Block: 2–4 aligned branches of one input concatenated along channels (dim 1 or -3),
    possibly with the bare input as a part. Fuses to exactly one conv and no BN (dim 1: given
    example inputs, which show that the input is batched)."""
    cin, cout, stride, offset = draw(aligned())
    n = draw(st.integers(n_min, n_max))
    bs = []
    for _ in range(n):
        c = draw(channels(cin, None))[2]  # each part its own width
        bs.append(draw(branches(cin, c, stride, offset, kinds=["conv", "identity", "dbb_1x1_kxk"])))
    assume(any(_carries_channels(b) for b in bs))
    mods, order = wire(bs, draw(st.permutations(range(n))))
    return Block(Cat(mods, order, draw(st.sampled_from(dims))), cin)


# ---- sequential blocks (test_rules_sequential) ----

@st.composite
def conv_bn(draw):
    """Any conv → BN."""
    conv = draw(convs())
    return Block(nn.Sequential(conv, draw(bns(conv.out_channels))), conv.in_channels)


@st.composite
def conv_bn_any_rank(draw):
    """Conv1d → BatchNorm1d or Conv3d → BatchNorm3d."""
    nd = draw(st.sampled_from([1, 3]))
    conv = draw(convs(nd=nd, max_padding=1))
    return Block(nn.Sequential(conv, draw(bns(conv.out_channels, nd=nd))), conv.in_channels, nd)


@st.composite
def bn_unpadded_conv(draw):
    """BN → any unpadded conv."""
    conv = draw(convs(max_padding=0))
    return Block(nn.Sequential(draw(bns(conv.in_channels)), conv), conv.in_channels)


@st.composite
def conv_pointwise(draw):
    """Any conv, then a 1×1 unpadded conv of any stride and groups."""
    first = draw(convs())
    second = draw(convs(first.out_channels, kernels=[(1, 1)], max_padding=0))
    return Block(nn.Sequential(first, second), first.in_channels)


@st.composite
def pointwise_pointwise(draw):
    """1×1 of stride s, unpadded, then 1×1 unpadded."""
    first = draw(convs(kernels=[(1, 1)], max_padding=0, strides=(1, 2, 3)))
    second = draw(convs(first.out_channels, kernels=[(1, 1)], max_padding=0))
    return Block(nn.Sequential(first, second), first.in_channels)


@st.composite
def pointwise_then_kxk(draw):
    """1×1 stride-1 conv, then any k×k conv: without bias before a padded conv, with or
    without bias before an unpadded one."""
    second = draw(convs())
    bias = not any(second.padding) and draw(st.booleans())
    first = draw(convs(cout=second.in_channels, kernels=[(1, 1)], max_padding=0, stride=(1, 1), bias=bias))
    return Block(nn.Sequential(first, second), first.in_channels)


@st.composite
def dbb_1x1_bnpad_kxk(draw):
    """DBB transform III: 1×1 conv (no bias) → BNAndPad(p) → unpadded k×k conv [→ BN]."""
    groups, cin, mid = draw(channels())
    second = draw(convs(mid, max_padding=0))
    tail = [draw(bns(second.out_channels))] if draw(st.booleans()) else []
    return Block(nn.Sequential(nn.Conv2d(cin, mid, 1, groups=groups, bias=False),
                               BNAndPad(mid, padding=draw(st.integers(0, 2)), eps=draw(st.sampled_from([1e-5, 0.1]))),
                               second, *tail), cin)


# ---- sequential chains ----

@st.composite
def chains(draw):
    """Block: [BN →] conv → 0–3 of (BN, 1×1 unpadded conv, dropout/identity), each composition
    exact (a leading BN's shift meets an unpadded conv). Fuses to one conv and no BN."""
    layers = []
    lead_bn = draw(st.booleans())
    conv = draw(convs(max_padding=0 if lead_bn else 2))
    if lead_bn:
        layers.append(draw(bns(conv.in_channels)))
    layers.append(conv)
    c = conv.out_channels
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["bn", "pointwise", "identity"]))
        if kind == "bn":
            layers.append(draw(bns(c)))
        elif kind == "pointwise":
            pw = draw(convs(c, kernels=[(1, 1)], max_padding=0))
            layers.append(pw)
            c = pw.out_channels
        else:
            layers.append(draw(identities()))
    return Block(nn.Sequential(*layers), conv.in_channels)


# ---- parallel blocks (test_rules_parallel) ----

@st.composite
def repvgg(draw):
    """RepVGG: k×k conv-BN + 1×1 conv-BN (+ BN of x where shapes allow), any groups/stride."""
    cin, cout, stride, _ = draw(aligned())
    kxk = draw(convs(cin, cout, stride=stride, offset=0, kernels=[(3, 3), (5, 5)], dilations=(1,), bias=False))
    one = draw(convs(cin, cout, stride=stride, offset=0, kernels=[(1, 1)], groups=kxk.groups, bias=False))
    bs = [nn.Sequential(kxk, draw(bns(cout))), nn.Sequential(one, draw(bns(cout)))]
    if cin == cout and stride == (1, 1):
        bs.append(draw(bns(cin)))
    return Block(Sum(bs, list(range(len(bs))), "plus"), cin)


@st.composite
def identity_bn(draw):
    """x + BN(x), in a drawn sum style: one 1×1 depthwise conv."""
    c = draw(channels())[1]
    style = draw(st.sampled_from(["plus", "radd", "torch.add", "sum", "sub", "tree"]))
    return Block(Sum([draw(bns(c))], draw(st.permutations([0, -1])), style), c)


@st.composite
def nested_sums(draw):
    """A sum whose branches are themselves sums of one input: still one conv."""
    cin, cout, stride, offset = draw(aligned())
    inner = [Sum([draw(branches(cin, cout, stride, offset, kinds=["conv"])) for _ in range(2)], [0, 1],
                 draw(st.sampled_from(["plus", "torch.add", "sum"]))) for _ in range(2)]
    return Block(Sum(inner, [0, 1], draw(st.sampled_from(["plus", "sub", "radd"]))), cin)


# ---- helper-rule blocks (test_rules_helpers) ----

@st.composite
def sum_with_pool(draw):
    """An average-pool branch (plain, or DBB's 1×1 → BNAndPad → pool → BN) beside 1–2 conv, BN
    or identity branches of the same input."""
    c = draw(channels(groups=draw(st.sampled_from([1, 2]))))[1]
    stride = draw(st.sampled_from([(1, 1), (2, 2)]))
    bs = [draw(branches(c, c, stride, 0, kinds=["avg", "dbb_avg"])),
          draw(branches(c, c, stride, 0, kinds=["conv", "bn"]))]  # the latter sizes the sum
    bs += [draw(branches(c, c, stride, 0, kinds=["conv", "bn", "identity"])) for _ in range(draw(st.integers(0, 1)))]
    mods, order = wire(bs, draw(st.permutations(range(len(bs)))))
    return Block(Sum(mods, order, draw(st.sampled_from(["plus", "torch.add", "sum"]))), c)


@st.composite
def pointwise_then_pool(draw):
    """1×1 stride-1 conv without bias → AvgPool(count_include_pad=True, any padding) [→ BN]."""
    conv = draw(convs(kernels=[(1, 1)], max_padding=0, stride=(1, 1), bias=False))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    pool = draw(avg_pools(k, draw(st.integers(1, 3)), draw(st.integers(0, k // 2))))
    tail = [draw(bns(conv.out_channels))] if draw(st.booleans()) else []
    return Block(nn.Sequential(conv, pool, *tail), conv.in_channels)


@st.composite
def dbb_pool_branch(draw):
    """DBB's pooling branch alone: 1×1 conv → BNAndPad(p) → AvgPool(k, s, 0) → BN."""
    groups, cin, cout = draw(channels())
    k = draw(st.sampled_from([1, 2, 3, 5]))
    return Block(nn.Sequential(nn.Conv2d(cin, cout, 1, groups=groups, bias=False),
                               BNAndPad(cout, padding=draw(st.integers(0, k // 2))),
                               nn.AvgPool2d(k, draw(st.integers(1, 2)), 0), draw(bns(cout))), cin)


@st.composite
def identity_plus_pool(draw):
    """x + AvgPool(x): the channel count comes from the example input alone."""
    k = draw(st.sampled_from([3, 5]))
    return Block(Sum([draw(avg_pools(k, 1, k // 2))], draw(st.permutations([0, -1])), "plus"),
                 draw(st.integers(1, 4)))


@st.composite
def scales(draw, body, c):
    """`body` times a constant or a per-channel parameter, in a drawn spelling."""
    style = draw(st.sampled_from(Scale.STYLES))
    value = draw(st.sampled_from([2.0, -0.5, 3, 1e-3]))
    return Scale(body, style, value, draw(st.sampled_from([(1, c, 1, 1), (c, 1, 1)])))


@st.composite
def scaled_convs(draw):
    """conv[-BN] times a constant or a per-channel parameter."""
    conv = draw(convs())
    body = nn.Sequential(conv, draw(bns(conv.out_channels))) if draw(st.booleans()) else conv
    return Block(draw(scales(body, conv.out_channels)), conv.in_channels)


@st.composite
def scaled_branches(draw):
    """A sum of aligned conv branches, some multiplied by constants or per-channel parameters."""
    cin, cout, stride, offset = draw(aligned(identity_ok=False))
    bs = [draw(branches(cin, cout, stride, offset, kinds=["conv"])) for _ in range(draw(st.integers(2, 3)))]
    bs = [draw(scales(b, cout)) if draw(st.booleans()) else b for b in bs]
    return Block(Sum(bs, list(range(len(bs))), draw(st.sampled_from(["plus", "sub", "sum"]))), cin)


@st.composite
def with_identities(draw):
    """[identity →] conv → 1–2 dropouts/identities → BN."""
    conv = draw(convs())
    layers = [draw(identities()) for _ in range(draw(st.integers(0, 1)))] + [conv] \
        + [draw(identities()) for _ in range(draw(st.integers(1, 2)))] + [draw(bns(conv.out_channels))]
    return Block(nn.Sequential(*layers), conv.in_channels)


@st.composite
def linear_bn(draw):
    """Linear → [dropout] → BatchNorm1d on (N, features), or BatchNorm1d → Linear."""
    fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    lin = nn.Linear(fin, fout, bias=draw(st.booleans()))
    if draw(st.booleans()):
        mid = [nn.Dropout(0.1)] if draw(st.booleans()) else []
        return Block(nn.Sequential(lin, *mid, draw(bns(fout, nd=1))), fin, nd=0)
    return Block(nn.Sequential(draw(bns(fin, nd=1)), lin), fin, nd=0)


# ---- blocks a rule must refuse (test_rules_refusals) ----

class Pair(nn.Module):
    """Two modules wired as `style`, each a trap for a rule.

    twice: (b(a(x)), a(x)) and reuse: a(b(a(x))): module a is called from two places;
    tuple: (b(c), c), gate: b(c) * sigmoid(c), sum: (c + b(x), c) with c = a(x): a's output is
    also used elsewhere; relu, tanh, square, flip: a(x) + b(f(x)): convs on different inputs."""
    FNS = {"relu": torch.relu, "tanh": torch.tanh, "square": lambda x: x * x, "flip": lambda x: x.flip(-1)}

    def __init__(self, a: nn.Module, b: nn.Module, style: str):
        super().__init__()
        self.a, self.b, self.style = a, b, style

    def extra_repr(self):
        return f"style={self.style!r}"

    def forward(self, x):
        s = self.style
        if s in self.FNS:
            return self.a(x) + self.b(self.FNS[s](x))
        if s == "twice":
            return self.b(self.a(x)), self.a(x)
        if s == "reuse":
            return self.a(self.b(self.a(x)))
        c = self.a(x)
        if s == "tuple":
            return self.b(c), c
        if s == "gate":
            return self.b(c) * torch.sigmoid(c)
        return c + self.b(x), c


@st.composite
def bias_before_padded_conv(draw):
    """1×1 conv with bias, or a BN, then a zero-padded conv: the fused border would differ."""
    second = draw(convs())
    assume(any(second.padding))
    c = second.in_channels
    first = draw(st.sampled_from(["conv", "bn"]))
    first = draw(convs(cout=c, kernels=[(1, 1)], max_padding=0, stride=(1, 1), bias=True)) \
        if first == "conv" else draw(bns(c))
    cin = first.in_channels if isinstance(first, nn.Conv2d) else c
    return Block(nn.Sequential(first, second), cin, reason="zero-padded")


@st.composite
def non_zero_padding(draw):
    """A conv padding with reflect/replicate/circular, then a BN or beside a zero-padded conv."""
    mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
    cin, cout, stride, _ = draw(aligned())
    conv = draw(convs(cin, cout, stride=stride, offset=0, kernels=[(3, 3), (5, 5), (1, 3), (3, 1)],
                      dilations=(1,), padding_mode=mode))
    if draw(st.booleans()):
        return Block(nn.Sequential(conv, draw(bns(cout))), cin, reason="padding_mode")
    other = draw(convs(cin, cout, stride=stride, offset=0))
    return Block(Sum([conv, other], draw(st.permutations([0, 1])), "plus"), cin, reason="padding_mode")


def _out(size, k, d, p, s):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def misaligned_sums(draw):
    """conv_a(x) + conv_b(x) with equal output shapes but different strides or centres (kernel,
    padding and dilation that do not line up), on a fixed input size."""
    size = draw(st.integers(1, 9))
    c = draw(st.integers(1, 3))
    layer = st.tuples(st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2]), st.integers(0, 2),
                      st.sampled_from([1, 2, 3]))
    a = draw(layer)
    out = _out(size, *a)
    assume(out >= 1)
    offset = lambda k, d, p, s: 2 * p - d * (k - 1)
    others = [b for b in ((k, d, p, s) for k in (1, 2, 3, 5) for d in (1, 2) for p in range(3) for s in (1, 2, 3))
              if _out(size, *b) == out and (b[3] != a[3] or offset(*b) != offset(*a))]
    assume(others)
    b = draw(st.sampled_from(others))
    make = lambda k, d, p, s: nn.Conv2d(c, c, k, s, p, d, bias=draw(st.booleans()))
    reason = "strides" if a[3] != b[3] else "not aligned"
    return Block(Sum([make(*a), make(*b)], [0, 1], draw(st.sampled_from(["plus", "sum"]))), c,
                 size=(size, size), reason=reason)


@st.composite
def pools_excluding_padding(draw):
    """AvgPool(count_include_pad=False) with padding, after a bias-free 1×1 conv or beside a conv."""
    c = draw(st.integers(1, 4))
    k = draw(st.sampled_from([3, 5]))
    pool = draw(avg_pools(k, 1, draw(st.integers(1, k // 2)), count_include_pad=False))
    if draw(st.booleans()):
        return Block(nn.Sequential(nn.Conv2d(c, c, 1, bias=False), pool), c, reason="count_include_pad")
    conv = draw(convs(c, c, stride=(1, 1), offset=0))
    return Block(Sum([conv, pool], draw(st.permutations([0, 1])), "plus"), c, reason="count_include_pad")


@st.composite
def shared_convs(draw):
    """One conv module called from two places, a BN after one of the calls."""
    c = draw(st.integers(1, 4))
    conv = draw(convs(c, c))
    return Block(Pair(conv, draw(bns(c)), draw(st.sampled_from(["twice", "reuse"]))), c,
                 reason="called from 2 places")


@st.composite
def tapped(draw):
    """conv → BN where the conv's output is also used elsewhere."""
    conv = draw(convs())
    return Block(Pair(conv, draw(bns(conv.out_channels)), draw(st.sampled_from(["tuple", "gate"]))),
                 conv.in_channels, reason="also used")


@st.composite
def tapped_sums(draw):
    """(a(x) + b(x), a(x)): a summed branch whose output is also returned."""
    cin, cout, stride, offset = draw(aligned(identity_ok=False))
    a, b = (draw(convs(cin, cout, stride=stride, offset=offset)) for _ in range(2))
    return Block(Pair(a, b, "sum"), cin)


@st.composite
def without_running_stats(draw):
    """conv → BN(track_running_stats=False), or that BN → unpadded conv: batch statistics."""
    conv = draw(convs(max_padding=0))
    before = draw(st.booleans())
    bn = nn.BatchNorm2d(conv.in_channels if before else conv.out_channels,
                        affine=draw(st.booleans()), track_running_stats=False)
    return Block(nn.Sequential(*([bn, conv] if before else [conv, bn])), conv.in_channels,
                 reason="running statistics")


class AffineAfterSum(nn.Module):
    """post(±a₀(f₀(x)) ± resize(…) …): convs of different tensors (f: identity, relu, tanh, flip),
    summed, the later terms resized to the first term's size (or `nested`: summed, then resized
    once, as GCNet's head reads x_det + resize(DAPPM(x_sem))), then an affine op `post`.
    `tap`: the sum is also returned."""
    FNS = {"id": lambda x: x, "relu": torch.relu, "tanh": torch.tanh, "flip": lambda x: x.flip(-1)}

    def __init__(self, convs, fns, signs, post, mode, nested, tap=False):
        super().__init__()
        self.convs, self.post = nn.ModuleList(convs), post
        self.fns, self.signs, self.mode, self.nested, self.tap = fns, signs, mode, nested, tap

    def extra_repr(self):
        return f"fns={self.fns}, signs={self.signs}, mode={self.mode!r}, nested={self.nested}, tap={self.tap}"

    def _resize(self, t, like):
        corners = {"align_corners": self.mode.endswith("-corners")} if self.mode.startswith("bi") else {}
        return F.interpolate(t, size=like.shape[2:], mode=self.mode.removesuffix("-corners"), **corners)

    def forward(self, x):
        ys = [c(self.FNS[f](x)) for c, f in zip(self.convs, self.fns)]
        if self.nested and len(ys) > 2:
            rest = ys[1]
            for t, sign in zip(ys[2:], self.signs[2:]):
                rest = rest + self._resize(t, ys[1]) if sign > 0 else rest - self._resize(t, ys[1])
            terms = [(rest, self.signs[1])]
        else:
            terms = list(zip(ys[1:], self.signs[1:]))
        s = ys[0] if self.signs[0] > 0 else -ys[0]
        for t, sign in terms:
            t = self._resize(t, ys[0])
            s = s + t if sign > 0 else s - t
        y = self.post(s)
        return (y, s) if self.tap else y


@st.composite
def affine_after_sums(draw, tap=False):
    """A BN, scale or shift after a sum of convs of different tensors (some resized): the
    affine op folds into the convs (fold_into_sum). With `tap` the sum is read elsewhere."""
    n = draw(st.integers(2, 4))
    groups, cin, cout = draw(channels())
    cs = [draw(convs(cin, cout, strides=(1, 2, 3), groups=groups)) for _ in range(n)]
    post = draw(st.sampled_from(["bn", "mul", "param", "shift"]))
    post = {"bn": lambda: draw(bns(cout)), "mul": lambda: Scale(nn.Identity(), "mul", -0.7),
            "param": lambda: Scale(nn.Identity(), "param", shape=(cout, 1, 1)),
            "shift": lambda: Shift(0.3)}[post]()
    fns = [draw(st.sampled_from(sorted(AffineAfterSum.FNS))) for _ in range(n)]
    signs = [draw(st.sampled_from([1, 1, -1])) for _ in range(n)]
    mode = draw(st.sampled_from(["nearest", "nearest-exact", "bilinear", "bilinear-corners",
                                 "bicubic", "area"]))
    block = AffineAfterSum(cs, fns, signs, post, mode, draw(st.booleans()), tap)
    return Block(block, cin, reason="also read by" if tap else "")


class Shift(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x + self.value


@st.composite
def different_inputs(draw):
    """a(x) + b(f(x)), a and b aligned conv[-BN] branches: conv-BN fold, the sum stays."""
    cin, cout, stride, offset = draw(aligned(identity_ok=False))
    a, b = (draw(branches(cin, cout, stride, offset, kinds=["conv"])) for _ in range(2))
    return Block(Pair(a, b, draw(st.sampled_from(sorted(Pair.FNS)))), cin)


@st.composite
def linear_bn_3d(draw):
    """Linear on the last dim, BatchNorm1d on dim 1, of a 3-D (N, C, L) input."""
    c, length = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    lin = nn.Linear(length, draw(st.integers(1, 5)), bias=draw(st.booleans()))
    return Block(nn.Sequential(lin, draw(bns(c, nd=1))), c, nd=1, size=(length,), reason="2-D")



class LinearNorm(nn.Module):
    """timm LeViT's Linear → BatchNorm1d: bn(y.flatten(start, end)).reshape_as(y), y = linear(x)
    (or .view_as(y))."""

    def __init__(self, linear: nn.Linear, bn: nn.BatchNorm1d, start: int, end: int, back: str):
        super().__init__()
        self.linear, self.bn, self.start, self.end, self.back = linear, bn, start, end, back

    def extra_repr(self):
        return f"flatten({self.start}, {self.end}), {self.back}"

    def forward(self, x):
        y = self.linear(x)
        z = self.bn(y.flatten(self.start, self.end))
        return z.reshape_as(y) if self.back == "reshape_as" else z.view_as(y)


@st.composite
def linear_norms(draw, exact=True):
    """LinearNorm on a 2-, 3- or 4-D input. exact: the flatten gives (rows, features), the BN
    normalizes the Linear's features; else (4-D, flatten(0, 1)) it normalizes the next-to-last
    dim, and the fold must be refused."""
    rank = draw(st.integers(2, 4) if exact else st.just(4))
    sizes = [draw(st.integers(1, 4)) for _ in range(rank - 1)]  # all dims but batch; the last: features
    lin = nn.Linear(sizes[-1], draw(st.integers(1, 5)), bias=draw(st.booleans()))
    end = rank - 2 if exact else 1
    bn = draw(bns(lin.out_features if exact else sizes[-2], nd=1))
    block = LinearNorm(lin, bn, 0, end, draw(st.sampled_from(["reshape_as", "view_as"])))
    return Block(block, sizes[0], nd=rank - 2, size=tuple(sizes[1:]),
                 reason="" if exact else "does not give")

# ---- weights, inputs, cases ----

@torch.no_grad()
def randomize(model: nn.Module, seed: int, dtype=torch.float32) -> nn.Module:
    """Every parameter and BN statistic from torch.Generator(seed), then cast to `dtype`.

    Conv weights ~ N(0, 1/fan_in) so outputs stay O(1); BN mean ~ N(0, 0.5²), var in [0.25, 2),
    weight ~ N(1, 0.5²), bias ~ N(0, 0.5²); any other parameter ~ N(1, 0.5²)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda t, s=1.0, m=0.0: t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * s + m)
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            randn(m.weight, 1 / math.sqrt(m.weight[0].numel()))
            if m.bias is not None:
                randn(m.bias, 0.5)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                randn(m.running_mean, 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.75 + 0.25)
            if m.affine:
                randn(m.weight, 0.5, 1.0)
                randn(m.bias, 0.5)
        else:
            for p in m.parameters(recurse=False):
                randn(p, 0.5, 1.0)
    return model.to(dtype)


def inputs(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@dataclass
class Case:
    """An eval-mode model with random weights and an input; `with_inputs`: pass the input to fuse."""
    model: nn.Module
    x: torch.Tensor
    seed: int
    with_inputs: bool
    max_macs_ratio: float = 1.0  # fuse's cost guard: 1.0 never raises MACs, inf merges all that is exact
    reason: str = ""  # what the report must say about the place a rule refuses


@torch.no_grad()
def _takes(model: nn.Module, x: torch.Tensor) -> bool:
    """The model runs on x and gives no empty output."""
    try:
        return all(t.numel() > 0 for t in tree_leaves(model(x)))
    except RuntimeError:
        return False


@st.composite
def cases(draw, blocks, dtypes=DTYPES, min_size=1, max_size=9, batch=2, with_inputs=None):
    """A Case of a drawn Block: the input's spatial sizes are drawn, sizes the block cannot
    take (an empty output, reflect padding wider than the input) grow until it can; fuse gets the
    input or not, and the default cost guard or none."""
    block = draw(blocks)
    seed = draw(seeds)
    dtype = draw(st.sampled_from(dtypes))
    sizes = block.size or tuple(draw(st.integers(min_size, max_size)) for _ in range(block.nd))
    shape = (batch, block.in_channels, *sizes) if block.nd else (batch, block.in_channels)
    model = randomize(block.module, seed, dtype).eval()
    for grow in [0] if block.size else range(0, 9, 2):  # a size the block cannot take: grow it
        x = inputs((*shape[:2], *(s + grow for s in shape[2:])), seed, dtype)
        if _takes(model, x):
            break
    else:
        assume(False)
    with_inputs = draw(st.booleans()) if with_inputs is None else with_inputs
    ratio = draw(st.sampled_from([1.0, math.inf]))
    return Case(model, x, seed, with_inputs, ratio, block.reason)


def fuse_checked(case: Case, rtol: float | None = None):
    """Fuse the case's model; assert the fused model computes the same function. (fused, report)"""
    fused, report = reparam.fuse_with_report(case.model, (case.x,) if case.with_inputs else None,
                                             max_macs_ratio=case.max_macs_ratio)
    note(str(report))
    note(f"fused graph:\n{getattr(fused, 'code', fused)}")
    check_equivalent(case.model, fused, case.x, rtol if rtol is not None else TOL[case.x.dtype])
    check_vetted(report)
    return fused, report


@torch.no_grad()
def check_equivalent(model, fused, x, rtol: float):
    """The fused model computes the model's function: within `rtol` of its outputs (relative to
    their largest magnitude), or, where the float32 model itself is that far from its exact
    (float64) function (outputs that are small differences of large terms, as random BN
    statistics give), no further from it than 4 times the model's own rounding error."""
    err = reparam.testing.model_rel_error(model, fused, x)
    if err <= rtol:
        return
    assert x.dtype != torch.float64, f"fused model differs: relative error {err:.3g} > {rtol:g}"
    exact = copy.deepcopy(model).double()(x.double())
    own, ours = rel_error(exact, model(x)), rel_error(exact, fused(x))
    assert ours <= max(rtol, 4 * own), (f"fused model differs: relative error {err:.3g} > {rtol:g}; from the "
                                        f"exact function {ours:.3g}, the model's own error {own:.3g}")


def check_vetted(report):
    """No rule raised, the self-check evaluated every rewrite, no rewrite was wrong."""
    assert not report.faults, str(report)
    assert not report.unchecked, report.unchecked
    assert not [n for n in report.notes if "undone" in n or "please report" in n], report.notes


def check_low_precision(case: Case, dtype: torch.dtype):
    """The case's float32 model cast to fp16/bf16 fuses to the same dtype, with one conv (none
    where it had none) and no BN left; its rounded weights compute the float32 function of the
    model's rounded weights within LOWP_TOL, and so does its low-precision output wherever the
    backend computes its convs accurately in that dtype."""
    # torch 2.14's CPU bfloat16 conv2d with different strides per axis reads outside its input:
    # results off by O(1) (measured 0.7-1e35 relative) and, now and then, a segfault
    assume(dtype != torch.bfloat16 or all(len(set(m.stride)) == 1 for m in case.model.modules()
                                          if isinstance(m, nn.modules.conv._ConvNd)))
    low = copy.deepcopy(case.model).to(dtype)
    fused = reparam.fuse(low, max_macs_ratio=math.inf)
    x = case.x.to(dtype)
    with torch.no_grad():
        reference = copy.deepcopy(low).float()(x.float())  # the float32 function of the rounded weights
        own = rel_error(reference, low(x).float())
        assume(own <= LOWP_TOL[dtype])  # the backend computes the model itself accurately here
        out = fused(x)
        ours = copy.deepcopy(fused).float()(x.float())
    assert out.dtype == dtype
    assert all(p.dtype == dtype for p in fused.parameters())
    assert rel_error(reference, ours) <= LOWP_TOL[dtype]  # what fusing rounds: the merged weights
    # end to end, where the backend runs the fused convs accurately (torch 2.14's CPU bf16 dense
    # conv2d with stride 2 on a width-1 or -2 input is off by O(1): then only the weights count)
    if rel_error(ours, out.float()) <= LOWP_TOL[dtype]:
        assert rel_error(reference, out.float()) <= max(LOWP_TOL[dtype], 4 * own)
    assert counts(fused, x) == (min(1, counts(case.model, case.x)[0]), 0)


def fuses_to_one_conv(case: Case, *, guard_may_refuse: bool = True, nothing_else: bool = False,
                      single_chain: bool = False):
    """Fuse the case: the same function and one conv and no BN left (see `check_one_conv`), or
    without example inputs a refusal for an unknown rank; the fused module.

    guard_may_refuse=False: the merge never costs more, so the cost guard must not refuse it.
    nothing_else: where merged, the graph runs nothing but the conv (no pool, mul, cat, add).
    single_chain: the case is one chain of ops, so a BatchNorm2d anywhere shows every rank."""
    fused, report = fuse_checked(case)
    if not case.with_inputs and skipped(report, "rank is unknown"):
        # a (1, C, 1, 1) constant on a Conv2d of unknown rank: on an unbatched input it would
        # raise the rank, so it merges only where the model shows the rank (a BatchNorm2d on
        # the way; in a single chain, any BatchNorm2d)
        assert not (single_chain and any(isinstance(m, nn.BatchNorm2d) for m in case.model.modules())), str(report)
        return fused
    if not guard_may_refuse:
        assert counts(fused, case.x) == (1, 0), str(report)
    merged = check_one_conv(case, fused, report)
    if merged and nothing_else:
        left = [str(n.target) for n in fused.graph.nodes if n.op in ("call_function", "call_method")
                or (n.op == "call_module" and not isinstance(fused.get_submodule(n.target), (nn.Conv2d, ChannelAffine)))]
        assert left == [], f"left in the graph: {left}"
    return fused


def check_one_conv(case: Case, fused: nn.Module, report) -> bool:
    """One conv and no BN left, unless the default cost guard refused a merge ("MACs" in a skip
    reason); then no more convs, and no more work per position (`work_per_position`) than the
    original. A block without convs keeps none (its per-channel maps become one ChannelAffine).
    True where it merged all."""
    after = reparam.count(fused, (case.x,))
    before = reparam.count(case.model, (case.x,))
    if not before.convs:  # a merge of BNs, pools and scales: never a new conv (item 6 of issue 10)
        assert after.convs == 0, f"a conv was added to a conv-free block: {before} → {after}"
        if not skipped(report, "would run one more"):  # per-channel maps only: one ChannelAffine
            assert after.bns == 0, f"expected no BN left, got {after}"
        return after.bns == 0
    if case.max_macs_ratio == math.inf or not skipped(report, "MACs"):
        assert (after.convs, after.bns) == (1, 0), f"expected 1 conv and 0 BN, got {after}"
        return True
    assert after.convs <= before.convs, f"the cost guard refused a merge, yet a conv was added: {before} → {after}"
    w0, w1 = work_per_position(case.model, case.x), work_per_position(fused, case.x)
    assert w1 <= w0 * (1 + 1e-9), f"the cost guard refused a merge, yet the work per position went up: {w0} → {w1}"
    return False


class _Work(_OpCounter):
    """The cost guard's model of work: every linear op costs the MACs of the conv it equals
    (a conv or matmul its MACs, counted as `reparam.count` does; a k×k average pool k² per
    output element; a BN, scale or tensor add one per output element); other ops nothing."""
    ELEMENTWISE = {"add", "sub", "mul", "div", "neg"} | _BN_OPS

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = func._overloadpacket.__name__
        first = out[0] if isinstance(out, (tuple, list)) else out
        if name.startswith("avg_pool"):
            self.macs += out.numel() * math.prod(args[1])
        elif name.rstrip("_") in self.ELEMENTWISE and isinstance(first, torch.Tensor):  # add_ too
            self.macs += first.numel()
        return out


@torch.no_grad()
def work_per_position(model: nn.Module, x: torch.Tensor) -> float:
    """The leading coefficient of the work (`_Work`) as a polynomial in the input's spatial
    size h: what the cost guard compares, per position, free of border effects. Exact: for h a
    multiple of every stride product (48·m), every size in the network is affine in h, so the
    work is a polynomial of degree nd, whose nd-th finite difference at step h is nd!·lead·h^nd."""
    nd = x.dim() - 2
    if nd <= 0:
        counter = _Work()
        with counter:
            model(x)
        return counter.macs
    h, values = 48, []
    for m in range(1, nd + 2):
        counter = _Work()
        with counter:
            model(x.new_zeros((1, x.shape[1], *([m * h] * nd))))
        values.append(counter.macs)
    diff = sum((-1) ** (nd - i) * math.comb(nd, i) * v for i, v in enumerate(values))
    return diff / (math.factorial(nd) * h ** nd)


def counts(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(convolutions, batch norms) one forward runs (a Linear counts as a conv)."""
    s = reparam.count(model, (x,))
    return s.convs, s.bns


def skipped(report, substring: str) -> list:
    """The report's skipped places whose reason contains `substring`."""
    return [s for s in report.skipped if substring in s.reason]
