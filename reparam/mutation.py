"""Mutation is data flow: every in-place write of a traced graph becomes a new value.

`functionalize(gm)` rewrites a graph from `torch.fx.symbolic_trace` (in-place modules and
functionals, `x.relu_()`, `torch.relu_`, `y += t`, `y[i] = v`, writes into views) so that no node
writes a tensor in place and every reader reads the value its original read at its place in
program order. A write into a view `v` of `b` gives `b` a new value (`functional.scatter`), and
views of `b` read later are taken again from it. The model's inputs are written back at the end
(`x.copy_(...)`), as the model writes them. Afterwards rules may move, merge and drop ops: a new
op reads exactly the value the ops it replaces read.

Where aliasing cannot be known from the graph (a write through `reshape`, which is a view or a
copy depending on strides, into a tensor that is read later) the graph is refused with a reason.
"""
from __future__ import annotations

import copy
import inspect
import operator
from functools import lru_cache

import torch
from torch import fx, nn

from . import functional

INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                     operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                     operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
                     operator.ior: operator.or_, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
                     operator.irshift: operator.rshift, operator.imatmul: operator.matmul}
# in-place methods whose name without "_" is the out-of-place method with the same arguments
OUT_OF_PLACE = {"add", "sub", "mul", "div", "neg", "abs", "relu", "sigmoid", "tanh", "clamp", "clamp_min",
                "clamp_max", "clip", "exp", "log", "sqrt", "rsqrt", "pow", "square", "masked_fill",
                "index_put", "index_add", "index_fill", "scatter", "scatter_add", "addcmul", "addcdiv",
                "hardtanh", "floor", "ceil", "round", "sign", "reciprocal", "lerp", "where", "t"}
# view ops: the result shares the input's storage, always
VIEW_METHODS = {"view", "view_as", "transpose", "permute", "expand", "expand_as", "narrow", "select",
                "squeeze", "unsqueeze", "unflatten", "movedim", "moveaxis", "swapaxes", "swapdims",
                "diagonal", "unfold", "as_strided", "detach", "t"}
# view ops that return a tuple of views (pieces) of the input, always: `a, b = torch.split(v, ...)`
PIECE_METHODS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}
# the result may share the input's storage or not, depending on strides, dtype, device
MAYBE_VIEW_METHODS = {"reshape", "reshape_as", "flatten", "contiguous", "to", "type", "type_as", "float",
                      "double", "half", "bfloat16", "cpu", "cuda", "T", "mT", "H", "mH", "data", "real", "imag"}
NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_", "record_stream"}  # return self
SIZE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
SIZE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "item", "tolist", "element_size",
                "stride", "storage_offset", "is_contiguous", "data_ptr", "get_device"}
_ARITH = {len, operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
          operator.truediv, operator.mod, operator.neg, operator.pow, *INPLACE_OPERATORS}
# modules that return their input itself (in eval mode) or a view of it
SAME_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.FeatureAlphaDropout)


class Refused(Exception):
    """The graph's aliasing cannot be settled; the message says where and why."""


@lru_cache(maxsize=None)
def _inplace_param(fn) -> int | None:
    """Position of a function's `inplace` parameter (F.relu, F.hardswish, ...), else None."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


_SYM = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
        torch.ops.aten.sym_storage_offset.default}


def is_size(a) -> bool:
    """`a` is no tensor: a size, rank or Python number (read from a tensor), or a constant."""
    if not isinstance(a, fx.Node):
        return True
    if a.op == "call_function" and a.target in _SYM:
        return True
    if a.op == "call_function" and a.target is getattr:
        return a.args[1] in SIZE_ATTRS
    if a.op == "call_method":
        return a.target in SIZE_METHODS
    if a.op == "call_function" and a.target in _ARITH:
        return bool(a.all_input_nodes) and all(is_size(n) for n in a.all_input_nodes)
    return False


def written(node: fx.Node, modules: dict) -> fx.Node | None:
    """The tensor node that `node` writes in place, else None."""
    first = _source(node)
    if not isinstance(first, fx.Node) or is_size(first):
        return None
    name = op_name(node)
    if node.op in ("call_function", "call_method") and isinstance(node.kwargs.get("out"), (fx.Node, tuple, list)):
        # `torch.mul(a, c, out=a)`: the out tensor is written, and may be resized or cast to its dtype
        raise Refused(f"'{node.name}' writes its out= argument in place")
    if node.op == "call_function":
        t = node.target
        if t in INPLACE_OPERATORS or t is operator.setitem or name == "__setitem__":
            return first
        pos = _inplace_param(t) if callable(t) and not isinstance(t, torch._ops.OpOverload) else None
        if pos is not None and (node.kwargs.get("inplace") is True or
                                (len(node.args) > pos and node.args[pos] is True)):
            return first
        if isinstance(t, torch._ops.OpOverload):
            return first if t._schema.is_mutable else None
        return first if name.endswith("_") and not name.startswith("_") and name not in NOT_WRITES else None
    if node.op == "call_method":
        return first if name.endswith("_") and not name.startswith("_") and name not in NOT_WRITES else None
    m = modules.get(node.target) if node.op == "call_module" else None
    if getattr(m, "inplace", False) is True:
        if m._forward_pre_hooks or m._forward_hooks:  # a pre-hook may hand it another tensor to write
            raise Refused(f"'{node.name}' is an in-place {type(m).__name__} with hooks: what it writes "
                          "cannot be told from the graph")
        return first
    return None


def _source(node: fx.Node):
    """The tensor an op reads first (its first argument, or its first keyword argument)."""
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def view_kind(node: fx.Node, modules: dict) -> str | None:
    """How `node`'s value relates to its first argument's storage: 'same' (the tensor itself),
    'view', 'maybe' (a view or a copy, depending on strides, dtype or device), else None."""
    first = _source(node)
    if not isinstance(first, fx.Node) or is_size(first):
        return None
    name = op_name(node)
    if node.op == "call_module":
        return "same" if type(modules.get(node.target)) in SAME_MODULES else \
            "maybe" if isinstance(modules.get(node.target), nn.Flatten) else None
    if node.op == "call_function" and node.target is operator.getitem:
        return "view" if _basic_index(node.args[1]) else None
    if node.op == "call_function" and node.target is getattr:
        return "maybe" if node.args[1] in MAYBE_VIEW_METHODS | VIEW_METHODS | PIECE_METHODS else None
    # torch.split is torch.functional.split
    if node.op == "call_method" or getattr(node.target, "__module__", None) in ("torch", "torch.functional"):
        if name in NOT_WRITES:
            return "same"
        if name in VIEW_METHODS or name in PIECE_METHODS:
            return "view"
        if name in MAYBE_VIEW_METHODS:
            return "maybe"
    if node.op == "call_function" and name.startswith("dropout") and node.kwargs.get("training") is False:
        return "same"
    return None


def _basic_index(idx) -> bool:
    """Only ints, slices, None and Ellipsis (sizes read from tensors count as ints): a view."""
    for i in idx if isinstance(idx, tuple) else (idx,):
        if isinstance(i, slice):
            if not all(is_size(p) for p in (i.start, i.stop, i.step)):
                return False
        elif not (i is None or i is Ellipsis or (isinstance(i, int) and not isinstance(i, bool))
                  or (isinstance(i, fx.Node) and is_size(i))):
            return False
    return True


def functionalize(gm: fx.GraphModule) -> int:
    """Rewrite `gm` in place so that it writes nothing in place but its inputs, at the end.
    Returns how many writes were rewritten; raises `Refused` where aliasing is unknowable."""
    return _Pass(gm).run()


class _Pass:
    def __init__(self, gm: fx.GraphModule):
        self.gm, self.graph = gm, gm.graph
        self.modules = dict(gm.named_modules())
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.parent: dict[fx.Node, tuple[fx.Node, str]] = {}  # alias -> (what it aliases, kind)
        self.value: dict[fx.Node, tuple[int, fx.Node]] = {}   # node -> (its root's version, value node)
        self.version: dict[fx.Node, int] = {}                 # root -> writes so far
        self.writes: list[fx.Node] = []
        self.functional_modules: dict[str, str] = {}

    def root(self, n: fx.Node) -> fx.Node:
        while n in self.parent:
            n = self.parent[n][0]
        return n

    def chain(self, n: fx.Node) -> list[fx.Node]:
        """[n, what n aliases, ..., its root]."""
        out = [n]
        while out[-1] in self.parent:
            out.append(self.parent[out[-1]][0])
        return out

    def current(self, n, at: fx.Node):
        """The node holding n's value at `at`: taken again from its root after a write."""
        if not isinstance(n, fx.Node):
            return n
        version = self.version.get(self.root(n), 0)
        stamp, val = self.value.get(n, (0, n))
        if stamp == version or n not in self.parent:
            return val
        up, kind = self.parent[n]
        if kind == "maybe":
            raise Refused(f"'{n.name}' ({op_name(n)} of '{up.name}') may or may not share memory with it, and "
                          f"'{up.name}' is written in place before '{at.name}' reads '{n.name}'")
        base = self.current(up, at)
        if kind == "same":
            val = base
        else:
            with self.graph.inserting_before(at):  # n's source is its first argument (see `run`)
                val = self.graph.node_copy(n, lambda a: self.current(a, at))
                if n.args:
                    val.update_arg(0, base)
                else:  # called by keyword: `self.m(input=x)`
                    val.update_kwarg(next(iter(n.kwargs)), base)
        self.value[n] = (version, val)
        return val

    def run(self) -> int:
        for node in list(self.graph.nodes):
            if node.op == "output":
                self._finish(node)
                break
            first = _source(node)
            target = written(node, self.modules)
            node.args = fx.node.map_arg(node.args, lambda a: self.current(a, node))
            node.kwargs = fx.node.map_arg(node.kwargs, lambda a: self.current(a, node))
            if target is not None:
                self._write(node, target)
            elif kind := view_kind(node, self.modules):
                self.parent[node] = (first, kind)
                self.value[node] = (self.version.get(self.root(first), 0), node)
        for node in reversed(self.writes):
            self.graph.erase_node(node)
        return len(self.writes)

    def _write(self, node: fx.Node, target: fx.Node):
        """`node` writes `target` in place: its new value, then each tensor it views gets it."""
        chain = self.chain(target)
        root = chain[-1]
        if root.op == "get_attr" and _is_state(self.gm, root.target):
            raise Refused(f"'{node.name}' writes the model's parameter or buffer '{root.target}' in place")
        for i, v in enumerate(chain[:-1]):
            if self.parent[v][1] == "maybe":  # v may be a copy: then nothing above it changes
                others = [m for m in self._members(root) if v not in self.chain(m)]
                # an input's value after the call is the caller's to read
                if root.op == "placeholder" or any(self._read_after(m, node) for m in others):
                    raise Refused(f"'{node.name}' writes '{v.name}', which may or may not share memory with "
                                  f"'{self.parent[v][0].name}' ({op_name(v)}), read later")
                self.value[v] = (self.version.get(root, 0), self.current(v, node))
                del self.parent[v]  # from here on v is a tensor of its own
                self.version[v] = self.version.get(root, 0)
                chain, root = chain[:i + 1], v
                break
        with self.graph.inserting_before(node):
            values, holders = [self._out_of_place(node)], [chain[0]]
            i = 0
            while i + 1 < len(chain):
                v, up = chain[i], chain[i + 1]
                if _pieces(up):  # v = up[k], a piece of a tensor: the write lands in that tensor
                    src = self._piece_source(node, v, up, chain[i + 2:])
                    values.append(self.graph.call_function(
                        functional.scatter_piece, (self.current(src, node), values[-1], v.args[1], op_name(up),
                                                   *up.args[1:]), dict(up.kwargs)))
                    holders.append(src)  # the tuple itself is taken again from it when read
                    i += 2
                    continue
                kind = self.parent[v][1]
                values.append(values[-1] if kind == "same" else self._scatter(v, self.current(up, node), values[-1]))
                holders.append(up)
                i += 1
        version = self.version.get(root, 0) + 1
        self.version[root] = version
        for n, val in zip(holders, values):
            self.value[n] = (version, val)
        self.parent[node] = (target, "same")  # x.relu_() returns x itself
        self.value[node] = (version, values[0])
        self.writes.append(node)

    def _out_of_place(self, node: fx.Node) -> fx.Node:
        g, args, kwargs, name = self.graph, node.args, dict(node.kwargs), op_name(node)
        if node.op == "call_module":
            return g.call_module(self._functional_module(node.target), args, kwargs)
        t = node.target
        if node.op == "call_function":
            if t in INPLACE_OPERATORS:
                return g.call_function(INPLACE_OPERATORS[t], args, kwargs)
            if t is operator.setitem or name == "__setitem__":
                return g.call_function(functional.setitem, args, kwargs)
            pos = _inplace_param(t) if callable(t) and not isinstance(t, torch._ops.OpOverload) else None
            if pos is not None:
                if len(args) > pos:
                    args = (*args[:pos], False, *args[pos + 1:])
                else:
                    kwargs["inplace"] = False
                return g.call_function(t, args, kwargs)
            if isinstance(t, torch._ops.OpOverload):
                raise Refused(f"'{node.name}' is an in-place ATen op ({t})")
        base = name[:-1]
        if base in OUT_OF_PLACE:
            return g.call_method(base, args, kwargs)
        return g.call_function(functional.inplace, (name, *args), kwargs)

    def _functional_module(self, target: str) -> str:
        """The module at `target` with inplace=False, in place of it in this graph module (the
        model's own module object is left alone)."""
        if target not in self.functional_modules:
            m = copy.copy(self.modules[target])
            m.inplace = False
            self.gm.add_submodule(target, m)
            self.modules[target] = m
            self.functional_modules[target] = target
        return target

    def _piece_source(self, node: fx.Node, v: fx.Node, up: fx.Node, rest: list) -> fx.Node:
        """The tensor that `up` (split, chunk, ...) cuts into pieces, where `v` is one of them."""
        k = v.args[1] if v.op == "call_function" and v.target is operator.getitem else None
        if not rest or not (isinstance(k, int) or (isinstance(k, fx.Node) and is_size(k))):
            raise Refused(f"'{node.name}' writes '{v.name}', part of the pieces '{up.name}' ({op_name(up)}) "
                          "taken other than one by one")
        return rest[0]

    def _scatter(self, view: fx.Node, base: fx.Node, value: fx.Node) -> fx.Node:
        """`base` with `view` (a view node of it) holding `value`."""
        if view.op == "call_function" and view.target is operator.getitem:
            return self.graph.call_function(functional.setitem, (base, view.args[1], value))
        return self.graph.call_function(functional.scatter, (base, value, op_name(view), *view.args[1:]),
                                        dict(view.kwargs))

    def _members(self, root: fx.Node) -> list[fx.Node]:
        return [root] + [n for n in self.parent if self.root(n) is root]

    def _read_after(self, n: fx.Node, at: fx.Node) -> bool:
        return any(self.order.get(u, -1) > self.order[at] for u in n.users)

    def _finish(self, output: fx.Node):
        output.args = fx.node.map_arg(output.args, lambda a: self.current(a, output))
        with self.graph.inserting_before(output):
            for n in self.graph.nodes:
                if n.op == "placeholder" and self.version.get(n, 0) and n not in self.parent:
                    self.graph.call_method("copy_", (n, self.value[n][1]))


def _pieces(node: fx.Node) -> bool:
    """`node` is a tuple of views of its first argument (`torch.split(v, ...)`), not a tensor."""
    return node.op in ("call_function", "call_method") and op_name(node) in PIECE_METHODS


def _is_state(gm: nn.Module, target: str) -> bool:
    """`target` names a parameter or buffer of the model (not a constant the tracer made)."""
    *path, name = target.split(".")
    try:
        owner = gm.get_submodule(".".join(path))
    except AttributeError:
        return False
    return name in owner._parameters or (name in owner._buffers and not name.startswith("_tensor_constant"))
