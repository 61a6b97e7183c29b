"""Branches that read the same tensor, summed or concatenated: one conv.

A sum is matched as one n-ary sum over its whole add-tree (`+`, `+=`, `-`, `torch.add`,
`sum([...])`), so no pattern is needed per ordering. Each term is either a linear op of some
tensor x (a branch of x) or any other tensor t (the identity branch of t); the branches of one
tensor are merged by `algebra.add`, the other terms are kept.
"""
from __future__ import annotations

from torch import fx

from .. import algebra
from ..ops import ADD, CAT, INPLACE, SUB, Graph, NewConv, Refusal, Rewrite, arg, is_op
from .common import as_conv, common_rank, linear


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
        if _is_sum(g, a) and g.single_use(a, node) and node.args.count(a) == 1:
            _terms(g, a, c, out, tree)
        else:
            out.append((a, c))


def _branches(g: Graph, terms):
    """Group terms by the tensor they read: {source: [(spec or None for identity, coef, node)]}."""
    groups: dict[fx.Node, list] = {}
    for t, c in terms:
        lin = linear(g, t)
        if isinstance(lin, tuple) and len(t.users) == 1 and not g.shared(t):
            spec, x = lin
            groups.setdefault(x, []).append((spec, c, t))
        else:
            groups.setdefault(t, []).append((None, c, t))
    return groups


def _merge(g: Graph, source: fx.Node, branches, rule: str, node: fx.Node, cat: bool):
    """The ConvSpec of the branches of one source, or a Refusal."""
    specs = [s for s, _, _ in branches if s is not None]
    nd = common_rank(specs, g.ndim(source))
    if isinstance(nd, str):
        return Refusal(rule, node, nd)
    cins = {algebra.channels(s)[0] for s in specs} - {None}
    chans = cins.pop() if len(cins) == 1 else None
    convs = []
    for spec, c, _ in branches:
        conv = algebra.identity(chans, nd) if spec is None and chans else as_conv(spec, chans, nd) \
            if spec is not None else "channel count unknown"
        if isinstance(conv, str):
            return Refusal(rule, node, conv)
        convs.append(algebra.scaled(conv, c) if c != 1.0 else conv)
    merged = algebra.concat(convs) if cat else algebra.add(convs)
    if isinstance(merged, str):
        return Refusal(rule, node, merged)
    return merged


def merge_sum(node: fx.Node, g: Graph):
    if not _is_sum(g, node):
        return None
    users = list(node.users)
    if len(users) == 1 and _is_sum(g, users[0]) and users[0].args.count(node) == 1:
        return None  # not the root of its add-tree
    terms, tree = [], []
    _terms(g, node, 1.0, terms, tree)
    result, erase, merged_any, refusal = [], list(tree), False, None
    for source, branches in _branches(g, terms).items():
        if len(branches) < 2 or all(s is None for s, _, _ in branches):
            result += [(t, c) for _, c, t in branches]
            continue
        spec = _merge(g, source, branches, "merge_sum", node, cat=False)
        if isinstance(spec, Refusal):
            refusal = refusal or spec
            result += [(t, c) for _, c, t in branches]
            continue
        replaced = [t for s, _, t in branches if s is not None]
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
        if isinstance(lin, tuple) and len(t.users) == 1 and not g.shared(t) and items.count(t) == 1:
            src, spec = lin[1], lin[0]
        else:
            src, spec = t, None
        if runs and runs[-1][0] is src:
            runs[-1][1].append((spec, 1.0, t))
        else:
            runs.append((src, [(spec, 1.0, t)]))
    result, erase, merged_any, refusal = [], [node], False, None
    for src, branches in runs:
        specs = [s for s, _, _ in branches if s is not None]
        nd = common_rank(specs, g.ndim(src)) if specs else None
        ok_dim = isinstance(nd, int) and (dim in (1, -(nd + 1)) if nd > 0 else dim == -1)
        if len(branches) < 2 or not specs or not ok_dim:
            if specs and len(branches) > 1 and not ok_dim and isinstance(nd, int):
                refusal = refusal or Refusal("merge_concat", node, f"concatenation along dim {dim}, not channels")
            result += [(t, 1.0) for _, _, t in branches]
            continue
        spec = _merge(g, src, branches, "merge_concat", node, cat=True)
        if isinstance(spec, Refusal):
            refusal = refusal or spec
            result += [(t, 1.0) for _, _, t in branches]
            continue
        replaced = [t for s, _, t in branches if s is not None]
        result.append((NewConv(spec, src, replaced + [node]), 1.0))
        erase += replaced
        merged_any = True
    if not merged_any:
        return refusal
    if len(result) == 1:
        return Rewrite("merge_concat", node, result, erase, f"{len(items)} branches → 1")
    return Rewrite("merge_concat", node, result, erase, f"{len(items)} tensors → {len(result)}",
                   cat_dim=dim)
