"""b(a(x)) with nothing between: one conv where `algebra.compose` says it is exact."""
from __future__ import annotations

import math

from torch import fx

from .. import algebra
from ..algebra import Affine
from ..ops import Graph, NewConv, Refusal, Rewrite, where
from .common import linear, then

NAME = "merge_sequential"


def merge_sequential(node: fx.Node, g: Graph):
    second = linear(g, node)
    if second is None:
        return None
    if isinstance(second, str):
        first_node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        # a linear op before it, even one that refuses too (a conv and its BN both called from
        # two places): the pair is not folded, and the report says why
        if first_node is not None and linear(g, first_node) is not None:
            return Refusal(NAME, node, second)
        return None
    b, a_node = second
    first = linear(g, a_node)
    if first is None:
        return None
    if isinstance(first, str):
        return Refusal(NAME, a_node, first)
    a, x = first
    if not g.single_use(a_node, node, same_shape=isinstance(b, Affine)):
        readers = sorted({where(u) for u in g.readers(a_node, same_shape=True)})
        return Refusal(NAME, a_node, f"its output is also used elsewhere: {len(readers)} ops read it "
                                             f"({', '.join(readers)})")
    if not (g.holds_conv(a_node) or g.holds_conv(node)):
        # two BN/pool/scale ops would become a conv; in a sum, merge_sum walks such chains itself
        return Refusal(NAME, node, "neither op is a convolution: merging them would add one")
    got = then(a, b, g.ndim(a_node))
    if isinstance(got, str):
        return Refusal(NAME, node, got)
    spec, ca, cb = got
    if cb.pointwise() and any(cb.padding) and g.max_macs_ratio < math.inf:
        # a padded 1×1 (DBB's BNAndPad) would make the first op run on its border too;
        # the following k×k absorbs it instead (and merge_sum walks such branch chains)
        return Refusal(NAME, node, "exact, but merged it would cost more MACs: the second op pads "
                                   "its input, so the first would run on the border too")
    if reason := algebra.costlier(spec, [(ca, math.prod(cb.stride)), (cb, 1)], g.max_macs_ratio):
        return Refusal(NAME, node, reason)
    return Rewrite(NAME, node, [(NewConv(spec, x, [a_node, node]), 1.0)], [node, a_node],
                   f"{g.label(a_node)} → {g.label(node)}")
