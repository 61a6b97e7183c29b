"""Rules that remove work without merging convs: constants folded, identities dropped."""
from __future__ import annotations


import torch
from torch import fx

from ..ops import (ADD, CAT, DIV, DROPOUT_FNS, IDENTITY_FNS, IDENTITY_METHODS, IDENTITY_MODULES, INPLACE,
                   MUL, SUB, Constant, Graph, Rewrite, _RANDOM, arg, is_op, plain, source)


def fold_constants(node: fx.Node, g: Graph):
    """An op whose inputs are all constants (a kernel built from parameters in `forward`, say)
    becomes one constant."""
    if node.op not in ("call_function", "call_method"):
        return None
    inputs = node.all_input_nodes
    if not (inputs or _factory(node)) or not all(g.is_const(n) for n in inputs):
        return None
    if any(u.op == "output" for u in node.users):
        return None  # returned: a stored constant the caller could write
    name = getattr(node.target, "__name__", str(node.target))
    if any(r in name for r in _RANDOM) or node.target in INPLACE or name.endswith("_"):
        return None
    args = fx.node.map_arg(node.args, g.const)
    kwargs = fx.node.map_arg(node.kwargs, g.const)
    if node.op == "call_method":
        value = getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        value = node.target(*args, **kwargs)
    if not isinstance(value, torch.Tensor):
        return None
    # computed in the model's dtype, as the model computes it at every call: the self-check
    # (float64) sees that dtype's rounding
    eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0
    return Rewrite("fold_constants", node, [(Constant(value), 1.0)], [node], name, tolerance=max(64 * eps, 1e-9))


def _factory(node: fx.Node) -> bool:
    """An ATen op that makes a tensor of fixed values from sizes alone (`torch.zeros((4, 4, 3, 3))`
    in a kernel built in forward, as torch.export records it): a constant like a parameter."""
    return isinstance(node.target, torch._ops.OpOverload) and \
        node.target._overloadpacket.__name__ in ("zeros", "ones", "full", "eye", "arange", "scalar_tensor")


def _mutated(node: fx.Node) -> bool:
    return any(u.target in INPLACE or (u.op == "call_method" and str(u.target).endswith("_"))
               for u in node.users)


def _is(a, value) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and a == value


def _identity_input(node: fx.Node, g: Graph):
    """x when `node` computes x itself, else None."""
    if node.op == "call_module":
        return source(node) if isinstance(g.module(node), IDENTITY_MODULES) and plain(g.module(node)) else None
    if is_op(node, DROPOUT_FNS):  # F.dropout(x, p, training=True), aten.dropout(x, p, train)
        training = node.args[2] if len(node.args) > 2 else \
            node.kwargs.get("training", node.kwargs.get("train", True))
        return None if training else source(node)
    if (is_op(node, IDENTITY_METHODS) or is_op(node, IDENTITY_FNS)) and len(node.args) + len(node.kwargs) == 1:
        return source(node)
    tensors = arg(node, 0, "tensors")
    if is_op(node, CAT) and isinstance(tensors, (list, tuple)) and len(tensors) == 1:
        return tensors[0]  # torch.cat([y]) is y
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if is_op(node, ADD) or is_op(node, SUB):
        return a if _is(b, 0) else b if _is(a, 0) and is_op(node, ADD) else None
    if is_op(node, MUL) or is_op(node, DIV):
        return a if _is(b, 1) else b if _is(a, 1) and is_op(node, MUL) else None
    return None


def remove_identity(node: fx.Node, g: Graph):
    """Eval-mode dropout, nn.Identity, clone/contiguous, `+ 0`, `* 1`: the input itself."""
    x = _identity_input(node, g) if node.op != "placeholder" else None
    if not isinstance(x, fx.Node) or _mutated(node) or node.target in INPLACE:
        return None
    if _returned_copy(node, x, g):
        return None
    return Rewrite("remove_identity", node, [(x, 1.0)], [node], node.name)


def _returned_copy(node: fx.Node, x: fx.Node, g: Graph) -> bool:
    """`node` is a fresh copy the graph returns, of an input, a weight or another output: the
    caller may write what it gets back, which must not write those."""
    if node.op == "call_module" or is_op(node, DROPOUT_FNS):
        return False  # Identity and eval Dropout return their input itself: nothing changes
    out = [u for u in node.users if u.op == "output"]
    return bool(out) and (x.op in ("placeholder", "get_attr") or any(x in u.all_input_nodes for u in out))
