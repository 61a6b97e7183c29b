"""Branches that read the same tensor, summed or concatenated: one conv.

A sum is matched as one n-ary sum over its whole add-tree (`+`, `+=`, `-`, `torch.add`,
`sum([...])`), so no pattern is needed per ordering. Each term is either a linear op of some
tensor x (a branch of x) or any other tensor t (the identity branch of t); the branches of one
tensor are merged by `algebra.add`, the other terms are kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import fx

from .. import algebra
from ..ops import ADD, CAT, INPLACE, SUB, Graph, NewConv, Refusal, Rewrite, arg, is_op
from .common import as_conv, common_rank, linear, then


def _is_sum(g: Graph, node: fx.Node) -> bool:
    """A tensor + tensor node (a tensor + constant is an affine map: merge_sequential's)."""
    if not (is_op(node, ADD) or is_op(node, SUB)) or len(node.args) != 2:
        return False
    if node.kwargs or not all(isinstance(a, fx.Node) and not g.is_const(a) for a in node.args):
        return False
    if node.target in INPLACE or (node.op == "call_method" and node.target.endswith("_")):
        # a += b mutates a: only a private temporary may be folded away
        return g.single_use(node.args[0], node)
    return True


def _terms(g: Graph, node: fx.Node, coef: float, out: list, tree: list):
    """Flatten the add-tree under `node` into (term, coefficient) pairs."""
    tree.append(node)
    for i, a in enumerate(node.args):
        c = -coef if i == 1 and is_op(node, SUB) else coef
        if _is_sum(g, a) and g.single_use(a, node, same_shape=True) and node.args.count(a) == 1:
            _terms(g, a, c, out, tree)
        else:
            out.append((a, c))


@dataclass
class Branch:
    spec: object            # a linear spec of `source`, or None: the identity
    coef: float
    nodes: list[fx.Node]    # the ops it replaces, the term first
    parts: list | None = None  # (ConvSpec, runs per output) of those ops, where walked back


def _walk(g: Graph, t: fx.Node, spec, x: fx.Node) -> tuple[Branch, fx.Node]:
    """Extend a branch back through single-use linear ops while composing them is exact.

    merge_sequential refuses a pair that costs more merged (a depthwise k×k then a 1×1); as a
    branch of a sum that merges into a k×k conv anyway, the pair may well pay off: merge_sum
    then compares the merged conv with all the ops it replaces."""
    branch = Branch(spec, 1.0, [t])
    while True:
        prev, last = x, branch.nodes[-1]
        lin = linear(g, prev)
        if not isinstance(lin, tuple) or g.shared(prev) or not g.single_use(prev, last):
            return branch, x
        p_spec, p_x = lin
        got = then(p_spec, branch.spec, g.ndim(prev))
        if isinstance(got, str):
            return branch, x
        composed, cp, cs = got
        branch.parts = [(cp, math.prod(cs.stride))] + (branch.parts or [(cs, 1)])
        branch.spec = composed
        branch.nodes.append(prev)
        x = p_x


def _branches(g: Graph, terms) -> dict[fx.Node, list[Branch]]:
    """Group terms by the tensor they read."""
    groups: dict[fx.Node, list[Branch]] = {}
    for t, c in terms:
        lin = linear(g, t)
        if isinstance(lin, tuple) and g.single_use(t, same_shape=True) and not g.shared(t):
            branch, x = _walk(g, t, *lin)
        else:
            branch, x = Branch(None, 1.0, [t]), t
        branch.coef = c
        groups.setdefault(x, []).append(branch)
    return groups


def _merge(g: Graph, source: fx.Node, branches: list[Branch], rule: str, node: fx.Node, cat: bool):
    """The ConvSpec of the branches of one source, or a Refusal."""
    specs = [b.spec for b in branches if b.spec is not None]
    nd = common_rank(specs, g.ndim(source))
    if isinstance(nd, str):
        return Refusal(rule, node, nd)
    cins = {algebra.channels(s)[0] for s in specs} - {None}
    chans = cins.pop() if len(cins) == 1 else g.channels(source, nd)
    convs, parts = [], []
    for b in branches:
        if b.spec is None:
            conv = algebra.identity(chans, nd) if chans else "channel count unknown"
        else:
            conv = as_conv(b.spec, chans, nd)
        if isinstance(conv, str):
            return Refusal(rule, node, conv)
        convs.append(algebra.scaled(conv, b.coef) if b.coef != 1.0 else conv)
        parts += b.parts or [(conv, 1)]
    merged = algebra.concat(convs) if cat else algebra.add(convs)
    if isinstance(merged, str):
        return Refusal(rule, node, merged)
    if reason := algebra.costlier(merged, parts, g.max_macs_ratio):
        return Refusal(rule, node, reason)
    return merged


def merge_sum(node: fx.Node, g: Graph):
    if not _is_sum(g, node):
        return None
    users = g.readers(node, same_shape=True)
    if len(users) == 1 and _is_sum(g, users[0]) and users[0].args.count(node) == 1:
        return None  # not the root of its add-tree
    terms, tree = [], []
    _terms(g, node, 1.0, terms, tree)
    result, erase, merged_any, refusal = [], list(tree), False, None
    for t, _ in terms:  # a term that looks linear but is not exact: say why it stays a branch
        if isinstance(reason := linear(g, t), str):
            refusal = refusal or Refusal("merge_sum", t, reason)
    for source, branches in _branches(g, terms).items():
        if len(branches) < 2 or all(b.spec is None for b in branches):
            result += [(b.nodes[0], b.coef) for b in branches]
            continue
        spec = _merge(g, source, branches, "merge_sum", node, cat=False)
        if isinstance(spec, Refusal):
            refusal = refusal or spec
            result += [(b.nodes[0], b.coef) for b in branches]
            continue
        replaced = [n for b in branches if b.spec is not None for n in b.nodes]
        result.append((NewConv(spec, source, replaced + tree), 1.0))
        erase += replaced
        merged_any = True
    if not merged_any:
        return refusal
    return Rewrite("merge_sum", node, result, erase, f"{len(terms)} terms → {len(result)}")


def merge_concat(node: fx.Node, g: Graph):
    if not is_op(node, CAT):
        return None
    items, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, fx.Node) for t in items):
        return None
    # consecutive items that read the same tensor form a run; a run of 2+ becomes one conv
    runs = []
    for t in items:
        lin = linear(g, t)
        if isinstance(lin, tuple) and g.single_use(t) and not g.shared(t) and items.count(t) == 1:
            src, spec = lin[1], lin[0]
        else:
            src, spec = t, None
        if runs and runs[-1][0] is src:
            runs[-1][1].append(Branch(spec, 1.0, [t]))
        else:
            runs.append((src, [Branch(spec, 1.0, [t])]))
    result, erase, merged_any, refusal = [], [node], False, None
    for src, branches in runs:
        specs = [b.spec for b in branches if b.spec is not None]
        nd = common_rank(specs, g.ndim(src)) if specs else None
        why = _channel_dim(dim, nd, g.ndim(src)) if isinstance(nd, int) else "rank unknown"
        if len(branches) < 2 or not specs or why:
            if specs and len(branches) > 1 and why and isinstance(nd, int):
                refusal = refusal or Refusal("merge_concat", node, why)
            result += [(b.nodes[0], 1.0) for b in branches]
            continue
        spec = _merge(g, src, branches, "merge_concat", node, cat=True)
        if isinstance(spec, Refusal):
            refusal = refusal or spec
            result += [(b.nodes[0], 1.0) for b in branches]
            continue
        replaced = [b.nodes[0] for b in branches if b.spec is not None]
        result.append((NewConv(spec, src, replaced + [node]), 1.0))
        erase += replaced
        merged_any = True
    if not merged_any:
        return refusal
    if len(result) == 1:
        return Rewrite("merge_concat", node, result, erase, f"{len(items)} branches → 1")
    return Rewrite("merge_concat", node, result, erase, f"{len(items)} tensors → {len(result)}",
                   cat_dim=dim)


def _channel_dim(dim: int, nd: int, rank: int | None) -> str | None:
    """Why concatenating along `dim` is not along channels for ops of spatial rank `nd` on a
    tensor of rank `rank` (None where unknown), or None. Channels are the last dim of a
    Linear's input and dim -(nd + 1) of a conv's, batched (N, C, ...) or not (C, ...)."""
    if nd == 0:
        return None if dim == -1 or (rank is not None and dim == rank - 1) else f"concatenation along dim {dim}, not features"
    if rank is None:
        if dim == -(nd + 1):
            return None
        return (f"concatenation along dim {dim} is along channels only if the input is batched "
                f"(pass example_inputs, or write dim={-(nd + 1)})") if dim == 1 else f"concatenation along dim {dim}, not channels"
    return None if dim % rank == rank - nd - 1 else f"concatenation along dim {dim}, not channels"
