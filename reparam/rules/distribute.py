"""An affine op (BN, scale, shift) after a sum of convolutions of different tensors: folded in.

a·(Σ ±convᵢ(xᵢ)) + b = Σ ±(a·convᵢ(xᵢ)) + b: the per-channel scale goes into every conv, the
shift into the bias of the first. A resize (interpolate / upsample) may stand between a sum
and its convs: it is linear per channel and keeps constants, so the affine map passes through
it. Every conv keeps its shape and name; only the affine op is gone. merge_sum cannot do this:
its branches read one tensor. DDRNet/GCNet's head is the case: BN(x_det + resize(DAPPM(x_sem))).
"""
from __future__ import annotations

from torch import fx

from ..algebra import Affine
from ..ops import SUB, Graph, NewConv, Refusal, Rewrite, is_op, where
from .common import linear, then
from .parallel import _is_sum

NAME = "fold_into_sum"


def _leaves(g: Graph, t: fx.Node, parent: fx.Node, sign: float, out: list) -> str | None:
    """Collect (conv node, ±1) under `t`, through sums and resizes read only by their parent;
    a reason where some term is not a conv (or is read elsewhere)."""
    if not g.single_use(t, parent, same_shape=True):
        others = sorted({where(u) for u in g.readers(t, same_shape=True) if u is not parent})
        return f"{where(t)} is also read by {', '.join(others) or 'the same op twice'}"
    if _is_sum(g, t):
        if t.args[0] is t.args[1]:
            return f"{t.name} adds a tensor to itself"
        for i, a in enumerate(t.args):
            if reason := _leaves(g, a, t, -sign if i == 1 and is_op(t, SUB) else sign, out):
                return reason
        return None
    if (x := g.resized(t)) is not None:
        return _leaves(g, x, t, sign, out)
    if isinstance(linear(g, t), tuple) and g.holds_conv(t) and not g.shared(t):
        out.append((t, sign))
        return None
    return f"term {where(t)} is not a convolution"


def fold_into_sum(node: fx.Node, g: Graph):
    lin = linear(g, node)
    if not isinstance(lin, tuple) or not isinstance(lin[0], Affine):
        return None
    affine, t = lin
    if not (_is_sum(g, t) or g.resized(t) is not None):
        return None
    leaves = []
    if reason := _leaves(g, t, node, 1.0, leaves):
        return Refusal(NAME, node, reason)
    substitute = []
    for i, (leaf, sign) in enumerate(leaves):
        spec, x = g.linear_of(leaf)
        shift = affine.shift * sign if i == 0 and affine.shift is not None else None
        post = Affine(affine.scale, shift, affine.nd, affine.dims)
        got = then(spec, post, g.ndim(leaf))
        if isinstance(got, str):
            return Refusal(NAME, node, got)
        substitute.append(NewConv(got[0], x, [leaf, node]))
    return Rewrite(NAME, node, [(t, 1.0)], [node] + [leaf for leaf, _ in leaves],
                   f"{g.label(node)} → {len(leaves)} convs", substitute=substitute)
