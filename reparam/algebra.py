"""The kernel algebra: pure float64 tensor functions, no graphs, no modules.

Every linear op the compiler understands becomes a `ConvSpec`: a zero-padded convolution
(N, C_in, *S) -> (N, C_out, *S') with `nd` spatial dims. nd == 0 is a Linear on the last dim.
Ops whose channel count comes from their neighbours (a scalar multiply, an average pool, a BN
of unknown rank) are `Affine`/`Pool` values that `as_conv` turns into a ConvSpec once the
channel count and rank are known. Functions that cannot give an exact result return a reason
(a str) instead of a spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce

import torch
from torch import Tensor

Reason = str
F64 = torch.float64


@dataclass(frozen=True)
class ConvSpec:
    weight: Tensor            # (out, in // groups, *kernel), float64
    bias: Tensor | None       # (out,), float64; None means no bias at all
    stride: tuple[int, ...]
    padding: tuple[int, ...]  # symmetric zero padding per spatial axis
    dilation: tuple[int, ...]
    groups: int = 1

    @property
    def nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def pointwise(self) -> bool:
        """A 1×1 (1×1×1, …) kernel: it reads one input position per output position."""
        return all(k == 1 for k in self.kernel)

    def has_bias(self) -> bool:
        """A bias that is not zero (on the meta device: any bias, values being unknown)."""
        return self.bias is not None and (self.bias.is_meta or bool(self.bias.ne(0).any()))


@dataclass(frozen=True)
class Affine:
    """y = x * scale + shift along the channel axis. `scale` is (C,) or a 0-dim scalar (any C).

    nd: rank of the spatial part, or None where it is not fixed (BatchNorm1d: (N, C) or
    (N, C, L); a scalar multiply: any). nd == 0 means the channel is the LAST dim.
    dims: how many dims the constants had (x * c has at least that rank): no more than the
    tensor's, or the product has another shape."""
    scale: Tensor
    shift: Tensor | None = None
    nd: int | None = None
    dims: int = 0


@dataclass(frozen=True)
class Pool:
    """AvgPool with zero padding counted in the divisor: a depthwise conv of constant weight."""
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    divisor: float

    @property
    def nd(self) -> int:
        return len(self.kernel)


@dataclass(frozen=True)
class Crop:
    """x[..., r:-r, ...]: the spatial border cut off, `crop[i]` on each side of axis i. As a conv:
    the identity with padding -crop (a conv reading a cropped input is the conv with that much
    less padding)."""
    crop: tuple[int, ...]

    @property
    def nd(self) -> int:
        return len(self.crop)


Linear = ConvSpec | Affine | Pool | Crop


def channels(spec: Linear) -> tuple[int | None, int | None]:
    """(in, out) channel counts, None where the op fits any count."""
    if isinstance(spec, ConvSpec):
        return spec.in_channels, spec.out_channels
    if isinstance(spec, Affine) and spec.scale.dim() == 1:
        return spec.scale.numel(), spec.scale.numel()
    return None, None


def rank(spec: Linear) -> int | None:
    return spec.nd


def conv_spec(weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> ConvSpec:
    """Normalize conv arguments: float64 tensors, per-axis tuples, dilation 1 on size-1 axes."""
    nd = weight.dim() - 2
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd
    kernel = weight.shape[2:]
    dilation = tuple(d if k > 1 else 1 for d, k in zip(tup(dilation), kernel))
    return ConvSpec(weight.detach().to(F64), None if bias is None else bias.detach().to(F64),
                    tup(stride), tup(padding), dilation, groups)


def bn_affine(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
              eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, each (C,)."""
    scale = torch.rsqrt(var.to(F64) + eps)
    if weight is not None:
        scale = scale * weight.to(F64)
    shift = -mean.to(F64) * scale
    if bias is not None:
        shift = shift + bias.to(F64)
    return scale, shift


def as_conv(spec: Linear, chans: int, nd: int) -> ConvSpec:
    """The ConvSpec of `spec` on `chans` channels and `nd` spatial dims."""
    if isinstance(spec, ConvSpec):
        return spec
    one = (1,) * nd
    if isinstance(spec, Crop):
        w = torch.ones(chans, 1, *one, dtype=F64)
        return ConvSpec(w, None, one, tuple(-c for c in spec.crop), one, chans)
    if isinstance(spec, Pool):
        w = torch.full((chans, 1, *spec.kernel), 1.0 / spec.divisor, dtype=F64)
        return ConvSpec(w, None, spec.stride, spec.padding, one, chans)
    scale = spec.scale.to(F64).expand(chans) if spec.scale.dim() == 0 else spec.scale.to(F64)
    shift = None if spec.shift is None else spec.shift.to(F64).expand(chans)
    w = scale.reshape(chans, 1, *one).clone()
    if nd == 0:  # a Linear has no groups: the diagonal matrix
        return ConvSpec(torch.diag(scale), shift, (), (), ())
    return ConvSpec(w, None if shift is None else shift.clone(), one, (0,) * nd, one, chans)


def per_channel(spec: ConvSpec) -> tuple[Tensor, Tensor | None] | None:
    """(scale, shift), each (C,), where `spec` only scales and shifts each channel (pointwise,
    stride 1, one channel per group or a diagonal matrix); else None. Padding is kept apart."""
    if not spec.pointwise() or any(s != 1 for s in spec.stride) or spec.in_channels != spec.out_channels:
        return None
    if spec.groups == spec.in_channels:
        return spec.weight.reshape(-1), spec.bias
    w = dense(spec).reshape(spec.out_channels, spec.in_channels)
    if w.is_meta:
        return None  # values unknown: not provably diagonal
    d = torch.diagonal(w)
    return (d.clone(), spec.bias) if torch.equal(w, torch.diag(d)) else None


def identity(chans: int, nd: int) -> ConvSpec:
    return as_conv(Affine(torch.ones((), dtype=F64)), chans, nd)


def scaled(spec: ConvSpec, c: float) -> ConvSpec:
    return replace(spec, weight=spec.weight * c, bias=None if spec.bias is None else spec.bias * c)


def dense(spec: ConvSpec) -> Tensor:
    """The groups=1 weight (out, in, *kernel) of a grouped conv: block diagonal."""
    if spec.groups == 1:
        return spec.weight
    g, w = spec.groups, spec.weight
    out_g, in_g = w.shape[0] // g, w.shape[1]
    full = w.new_zeros(w.shape[0], in_g * g, *w.shape[2:])
    for i in range(g):
        full[i * out_g:(i + 1) * out_g, i * in_g:(i + 1) * in_g] = w[i * out_g:(i + 1) * out_g]
    return full


def regroup(weight: Tensor, groups: int) -> Tensor:
    """The grouped weight (out, in // groups, *kernel) of a dense block-diagonal one (its blocks
    off the diagonal are zero by construction: products and sums of grouped convs)."""
    if groups == 1:
        return weight
    out, inp = weight.shape[:2]
    blocks = weight.reshape(groups, out // groups, groups, inp // groups, *weight.shape[2:])
    return torch.cat([blocks[i, :, i] for i in range(groups)])


def _make(weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int = 1) -> ConvSpec:
    """A spec from a dense weight that is block-diagonal with `groups` blocks. Groups follow from
    the structure of what was combined (gcd of the groups), never from the values, so a model
    and its copy on the meta device fuse to the same structure."""
    return ConvSpec(regroup(weight, groups), bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def _one_device(*specs: ConvSpec) -> list[ConvSpec]:
    """The specs with their tensors on one device: the meta device if any is there (constants
    such as identity kernels are made on the CPU)."""
    if not any(s.weight.is_meta for s in specs):
        return list(specs)
    meta = lambda t: None if t is None else t.to("meta")
    return [replace(s, weight=meta(s.weight), bias=meta(s.bias)) for s in specs]


def _add_bias(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def compose(a: ConvSpec, b: ConvSpec) -> ConvSpec | Reason:
    """The single conv equal to `b(a(x))`, or why there is none.

    Exact when b is a 1×1 unpadded conv (any stride: a 1×1 stride-s conv only subsamples), or
    when a is a 1×1 stride-1 conv whose output border (a's bias where a pads, zero beyond) is
    what b's zero padding would give: b unpadded, or a without bias."""
    if a.nd != b.nd:
        return f"ranks differ ({a.nd}-d then {b.nd}-d)"
    a, b = _one_device(a, b)
    if a.out_channels != b.in_channels:
        return f"channels differ ({a.out_channels} out, {b.in_channels} in)"
    if _diagonal(b) and not any(b.padding):  # a BN after a conv: scale its output channels
        s = b.weight.reshape(-1)
        view = (-1,) + (1,) * (a.weight.dim() - 1)
        bias = None if a.bias is None else a.bias * s
        return replace(a, weight=a.weight * s.view(view), bias=_add_bias(bias, b.bias),
                       stride=tuple(x * y for x, y in zip(a.stride, b.stride)))
    if _diagonal(a) and all(st == 1 for st in a.stride) and not (any(b.padding) and a.has_bias()):
        # a BN before a conv: scale the conv's input channels (kept grouped)
        s = a.weight.reshape(b.groups, -1)  # per input channel, by group
        rep = b.out_channels // b.groups
        s_rows = s.repeat_interleave(rep, dim=0).view(*b.weight.shape[:2], *(1,) * b.nd)
        bias = None if a.bias is None else (b.weight * a.bias.reshape(b.groups, -1).repeat_interleave(
            rep, dim=0).view(*b.weight.shape[:2], *(1,) * b.nd)).sum(dim=tuple(range(1, b.weight.dim())))
        return replace(b, weight=b.weight * s_rows, bias=_add_bias(bias, b.bias),
                       padding=tuple(x + y for x, y in zip(a.padding, b.padding)))
    if b.pointwise() and not any(b.padding):
        mb = dense(b).reshape(b.out_channels, b.in_channels)
        # b's 1×1 matrix times a's kernel, group by group of a (never a's dense kernel)
        ga, per = a.groups, a.out_channels // a.groups
        wa = a.weight.reshape(ga, per, *a.weight.shape[1:])
        w = torch.einsum("ogr,gri...->ogi...", mb.reshape(-1, ga, per), wa).flatten(1, 2)
        bias = None if a.bias is None else mb @ a.bias
        stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride))
        return _make(w, _add_bias(bias, b.bias), stride, a.padding, a.dilation, math.gcd(a.groups, b.groups))
    if a.pointwise() and all(s == 1 for s in a.stride):
        if any(b.padding) and a.has_bias():
            return ("a bias before a zero-padded conv: the padded border would get the bias "
                    "in the fused conv but zero in the original")
        ma = dense(a).reshape(a.out_channels, a.in_channels)
        # b's kernel times a's 1×1 matrix, group by group of b (never b's dense kernel)
        gb, per = b.groups, b.out_channels // b.groups
        wb = b.weight.reshape(gb, per, *b.weight.shape[1:])
        w = torch.einsum("gor...,gri->goi...", wb, ma.reshape(gb, -1, ma.shape[1])).flatten(0, 1)
        bias = None if a.bias is None else \
            torch.einsum("gor...,gr->go", wb, a.bias.reshape(gb, -1)).flatten()
        padding = tuple(pa + pb for pa, pb in zip(a.padding, b.padding))
        return _make(w, _add_bias(bias, b.bias), b.stride, padding, b.dilation, math.gcd(a.groups, b.groups))
    if not b.pointwise():
        return (f"a {_kstr(a)} conv then a {_kstr(b)} conv: only a 1×1 stride-1 first conv or "
                "a 1×1 unpadded second conv compose exactly")
    return f"the 1×1 second conv pads its input ({b.padding}): the border is not a conv of x"


def macs(spec: ConvSpec) -> int:
    """Multiply-accumulates per output position."""
    return spec.out_channels * spec.weight[0].numel()


def costlier(merged: ConvSpec, parts: list[tuple[ConvSpec, int]], ratio: float = 1.0) -> Reason | None:
    """Why `merged` is not worth it: it costs more than `ratio` times the MACs per output
    position of `parts` ((spec, how many of its outputs one merged output needs) run in turn)."""
    before = sum(macs(s) * n for s, n in parts)
    if macs(merged) > ratio * before:
        return (f"exact, but the merged conv would cost {macs(merged):,} MACs per output "
                f"position instead of {before:,}")
    return None


def _diagonal(spec: ConvSpec) -> bool:
    """A per-channel scale (and bias): pointwise, one channel per group."""
    return spec.pointwise() and spec.groups == spec.in_channels == spec.out_channels \
        and spec.nd > 0


def _kstr(spec: ConvSpec) -> str:
    s = "×".join(map(str, spec.kernel)) or "linear"
    if any(st > 1 for st in spec.stride):
        s += f" stride {'×'.join(map(str, spec.stride))}"
    return s


def _align(specs: list[ConvSpec]) -> tuple[list[tuple[slice, ...]], tuple, tuple, tuple] | Reason:
    """Place kernels of different sizes/dilations/paddings in one kernel, centres aligned.

    Returns (slices into the merged kernel per spec, merged kernel size, padding, dilation)."""
    nd = specs[0].nd
    if any(s.nd != nd for s in specs):
        return "branches have different ranks"
    if len({s.stride for s in specs}) > 1:
        return f"branches have different strides {sorted({s.stride for s in specs})}"
    slices = [[] for _ in specs]
    size, pad, dil = [], [], []
    for ax in range(nd):
        extents = [s.dilation[ax] * (s.kernel[ax] - 1) for s in specs]
        # output size and centre depend on 2p - extent: equal for all, or the sum is misaligned
        offsets = {2 * s.padding[ax] - e for s, e in zip(specs, extents)}
        if len(offsets) > 1:
            return (f"branch centres are not aligned on axis {ax} (kernel/padding/dilation "
                    f"{[(s.kernel[ax], s.padding[ax], s.dilation[ax]) for s in specs]})")
        p = max(s.padding[ax] for s in specs)
        steps = [s.dilation[ax] for s in specs if s.kernel[ax] > 1] + [p - s.padding[ax] for s in specs]
        d = reduce(math.gcd, steps, 0) or 1
        e = max(extents)
        size.append(e // d + 1)
        pad.append(p)
        dil.append(d if e else 1)
        for sl, s in zip(slices, specs):
            start = (p - s.padding[ax]) // d
            step = s.dilation[ax] // d if s.kernel[ax] > 1 else 1
            sl.append(slice(start, start + step * (s.kernel[ax] - 1) + 1, step))
    return [tuple(s) for s in slices], tuple(size), tuple(pad), tuple(dil)


def _placed(specs: list[ConvSpec]) -> tuple[list[Tensor], tuple, tuple] | Reason:
    """Each spec's dense weight placed in the common kernel, plus (padding, dilation)."""
    aligned = _align(specs)
    if isinstance(aligned, str):
        return aligned
    slices, size, pad, dil = aligned
    out = []
    for s, sl in zip(specs, slices):
        w = dense(s)
        big = w.new_zeros(*w.shape[:2], *size)
        big[(slice(None), slice(None), *sl)] = w
        out.append(big)
    return out, pad, dil


def add(specs: list[ConvSpec]) -> ConvSpec | Reason:
    """The single conv equal to the sum of `specs` applied to one input, or why there is none.

    Zero padding then a bias added after the conv is exact whatever the padding, so biases sum."""
    if len({s.in_channels for s in specs}) > 1 or len({s.out_channels for s in specs}) > 1:
        return f"branch channels differ {sorted({(s.in_channels, s.out_channels) for s in specs})}"
    specs = _one_device(*specs)
    aligned = _align(specs)
    if isinstance(aligned, str):
        return aligned
    slices, size, pad, dil = aligned
    keep = len({s.groups for s in specs}) == 1  # else dense, regrouped after
    weights = [s.weight if keep else dense(s) for s in specs]
    total = weights[0].new_zeros(*weights[0].shape[:2], *size)  # each weight added in its place
    for w, sl in zip(weights, slices):
        total[(slice(None), slice(None), *sl)] += w
    bias = reduce(_add_bias, [s.bias for s in specs])
    if keep:
        return ConvSpec(total, bias, specs[0].stride, pad, dil, specs[0].groups)
    return _make(total, bias, specs[0].stride, pad, dil, reduce(math.gcd, [s.groups for s in specs]))


def concat(specs: list[ConvSpec]) -> ConvSpec | Reason:
    """The single conv equal to the channel concatenation of `specs` on one input."""
    if len({s.in_channels for s in specs}) > 1:
        return "branches read different channel counts"
    specs = _one_device(*specs)
    # group j of each branch reads the same inputs, but the outputs land apart: dense
    placed = _placed(specs)
    if isinstance(placed, str):
        return placed
    weights, pad, dil = placed
    if all(s.bias is None for s in specs):
        bias = None
    else:
        bias = torch.cat([s.bias if s.bias is not None else s.weight.new_zeros(s.out_channels)
                          for s in specs])
    return _make(torch.cat(weights), bias, specs[0].stride, pad, dil)
