"""Per-channel maps seen through a flatten, and reshapes that undo a flatten.

LeViT (timm's `LinearNorm`) writes Linear → BatchNorm1d as `bn(y.flatten(0, 1)).reshape_as(y)`
with y = linear(x) of shape (B, N, C): BatchNorm1d normalizes dim 1 of the flattened (B·N, C)
tensor, which is y's last dim, the Linear's output features. So BN(flatten(linear(x))) is
flatten(linear'(x)) with the BN folded into the Linear, and reshape_as then only undoes the
flatten. Exact only when the flattened tensor is 2-D and keeps y's last dim: that needs shapes
(example inputs), as BatchNorm1d beside a Linear does anywhere.
"""
from __future__ import annotations

import torch
from torch import fx

from .. import algebra
from ..algebra import Affine
from ..ops import Graph, NewConv, Refusal, Rewrite, arg, where
from .common import as_conv, common_rank, linear
from .simplify import _mutated

NAME = "fold_through_flatten"
_RESHAPES = {"reshape", "view", "flatten"}


def _flatten(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(input, start_dim, end_dim) of x.flatten(...) / torch.flatten(x, ...)."""
    if (node.op == "call_method" and node.target == "flatten") or \
            (node.op == "call_function" and node.target is torch.flatten):
        x = arg(node, 0, "input")
        return (x, arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)) if isinstance(x, fx.Node) else None
    return None


def _permute(node: fx.Node) -> tuple[fx.Node, tuple] | None:
    """(input, dims) of x.permute(*dims), x.permute(dims) or torch.permute(x, dims)."""
    if node.op == "call_method" and node.target == "permute":
        x, dims = node.args[0], node.args[1:] or (node.kwargs.get("dims"),)
    elif node.op == "call_function" and node.target is torch.permute:
        x, dims = arg(node, 0, "input"), (arg(node, 1, "dims"),)
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    ok = isinstance(x, fx.Node) and all(isinstance(d, int) for d in dims)
    return (x, tuple(d % len(dims) for d in dims)) if ok else None


def _linear_layer(g: Graph, y: fx.Node):
    """(spec, input) where `y` is a Linear (a conv on the last dim), else None."""
    first = linear(g, y)
    return first if isinstance(first, tuple) and g.holds_conv(y) and first[0].nd == 0 else None


def _fold(g: Graph, rule: str, node: fx.Node, affine: Affine, view: fx.Node, y: fx.Node, rank: int):
    """affine(view(linear(x))) as view(linear'(x)): the view keeps the Linear's features as the
    axis the affine map scales; `rank` is the view's."""
    if isinstance(reason := common_rank([affine], rank), str):  # a constant of more dims than the view
        return Refusal(rule, node, reason)
    for n, user in ((view, node), (y, view)):
        if not g.single_use(n, user, same_shape=True) or g.shared(n):
            others = ", ".join(where(u) for u in g.readers(n) if u is not user)
            return Refusal(rule, n, f"its output is also used by {others}")
    spec, x = _linear_layer(g, y)
    chans = algebra.channels(spec)[1]
    merged = algebra.compose(spec, as_conv(Affine(affine.scale, affine.shift, 0), chans, 0))
    if isinstance(merged, str):
        return Refusal(rule, node, merged)
    return Rewrite(rule, node, [(view, 1.0)], [node, y], f"{g.label(y)} → {g.label(node)}",
                   substitute=[NewConv(merged, x, [y, node])])


def fold_through_flatten(node: fx.Node, g: Graph):
    lin = linear(g, node)
    if not isinstance(lin, tuple) or not isinstance(lin[0], Affine) or lin[0].nd is not None:
        return None  # a BatchNorm1d (or per-channel map of any rank) on dim 1
    affine, f = lin
    flat = _flatten(f)
    if flat is None:
        return None
    y, _, end = flat
    if _linear_layer(g, y) is None:
        return None
    ny, nf = g.ndim(y), g.ndim(f)
    if ny is None or nf is None:
        return Refusal(NAME, node, "rank unknown (pass example_inputs)")
    if nf != 2 or end % ny == ny - 1:
        return Refusal(NAME, node, f"the flatten does not give (rows, {y.name}'s last dim)")
    return _fold(g, NAME, node, affine, f, y, nf)


def fold_through_permute(node: fx.Node, g: Graph):
    """A per-channel map (BatchNorm2d, a layer scale `gamma * y`) after `permute` moves a
    channels-last Linear's features to dim 1 (ConvNeXt-style blocks): folded into the Linear."""
    lin = linear(g, node)
    if not isinstance(lin, tuple) or not isinstance(lin[0], Affine):
        return None
    affine, p = lin
    perm = _permute(p)
    if perm is None or _linear_layer(g, perm[0]) is None:
        return None
    y, dims = perm
    rank = len(dims)
    if dims != (0, rank - 1, *range(1, rank - 1)) or (affine.scale.dim() and affine.nd not in (None, rank - 2)):
        return Refusal("fold_through_permute", node, f"the permute {dims} does not move {y.name}'s features "
                                                     "to the channels this op scales")
    return _fold(g, "fold_through_permute", node, affine, p, y, rank)


def undo_reshape(node: fx.Node, g: Graph):
    """z.reshape_as(y) / z.view_as(y) where z is a flatten, view or reshape of y: y itself."""
    if node.op != "call_method" or node.target not in ("reshape_as", "view_as") or len(node.args) != 2:
        return None
    z, y = node.args
    if _mutated(node):
        return None
    if not (isinstance(z, fx.Node) and z.op == "call_method" and z.target in _RESHAPES and z.args[0] is y):
        return None
    return Rewrite("undo_reshape", node, [(y, 1.0)], [node, z], f"{z.name} → {node.name}")
