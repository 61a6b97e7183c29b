"""What several rules need: a node's linear view, and specs made concrete on a common rank."""
from __future__ import annotations

from torch import fx

from .. import algebra
from ..algebra import Affine, ConvSpec, Reason
from ..ops import Graph


def linear(g: Graph, node: fx.Node):
    """(spec, input) if `node` is a linear map of one tensor, a reason if it is not exact to
    treat it so, else None."""
    got = g.linear_of(node)
    if isinstance(got, tuple) and (got[0] is None or not isinstance(got[1], fx.Node)):
        return None
    return got


def _rank(spec) -> int | str | None:
    """Spatial rank; 'any' for a scalar multiply; None for 'channel dim 1, rank unknown'."""
    if isinstance(spec, Affine) and spec.scale.dim() == 0:
        return "any"
    return spec.nd


def common_rank(specs: list, ndim: int | None) -> int | Reason:
    """The spatial rank all `specs` can share; `ndim` is the tensor rank where it is known."""
    ranks = {_rank(s) for s in specs} - {"any"}
    fixed = ranks - {None}
    if len(fixed) > 1:
        return f"ops of different ranks {sorted(fixed)}"
    if fixed:
        nd = fixed.pop()
        if nd == 0 and None in ranks and ndim != 2:
            # BatchNorm1d normalizes dim 1, a Linear maps the last dim: the same only on 2-D input
            return "a BatchNorm1d beside a Linear is exact only on 2-D input (pass example_inputs)"
    elif ndim is not None:
        nd = max(ndim - 2, 0)
    else:
        return "rank unknown (pass example_inputs)"
    # a constant of more dims than the tensor broadcasts it up (shapes unknown: the tensor may
    # be unbatched, as a Conv2d's input and output may be)
    most = ndim if ndim is not None else nd + 1
    dims = max([s.dims for s in specs if isinstance(s, Affine)], default=0)
    if dims > most:
        if ndim is None:
            return (f"a {dims}-d constant would broadcast an unbatched {most}-d tensor to another "
                    "shape, and the rank is unknown (pass example_inputs)")
        return f"a constant of more dims than the {most}-d tensor it multiplies would broadcast it to another shape"
    return nd


def then(a, b, ndim: int | None) -> tuple[ConvSpec, ConvSpec, ConvSpec] | Reason:
    """b after a as one ConvSpec, with the ConvSpecs of a and b it came from, or why there is
    none; `ndim` is the rank of the tensor between them, where it is known."""
    nd = common_rank([a, b], ndim)
    if isinstance(nd, str):
        return nd
    mid = algebra.channels(a)[1] or algebra.channels(b)[0]
    ca, cb = as_conv(a, mid, nd), as_conv(b, mid, nd)
    for c in (ca, cb):
        if isinstance(c, str):
            return c
    spec = algebra.compose(ca, cb)
    return spec if isinstance(spec, str) else (spec, ca, cb)


def as_conv(spec, chans: int | None, nd: int) -> ConvSpec | Reason:
    """`spec` as a ConvSpec; `chans` gives the channel count of ops that fit any count."""
    cin = algebra.channels(spec)[0]
    if cin is None and chans is None:
        return "channel count unknown"
    return algebra.as_conv(spec, cin or chans, nd)
