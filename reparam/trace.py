"""Front ends: a model in, a mutation-free torch.fx GraphModule out (or why not).

`symbolic_trace` with parameters kept concrete, so a kernel built from parameters inside
`forward` (OREPA) is computed at trace time and enters the graph as a constant. The tracer also
records what a plain fx trace loses: slice assignment (`y[i] = v`) and augmented assignment
(`y += t`, which fx records as `y + t`, dropping the write into every alias of y); then
`mutation.functionalize` turns every in-place write into data flow. Modules with hooks stay
calls of their own (their hooks keep firing). `torch.export` with example inputs where symbolic
tracing fails (shape-dependent code, `int(x.shape[2])`), functionalized by its own
decompositions, with dynamic sizes where the model allows them.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._sympy.numbers import int_oo
from torch.utils._pytree import tree_leaves, tree_map

from . import mutation
from .nn import BNAndPad
from .stats import _OpCounter

aten = torch.ops.aten


class _Proxy(fx.Proxy):
    """A Proxy that records `y[i] = v` and `y += t` as the writes they are."""

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _augmented(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _op in mutation.INPLACE_OPERATORS:
    setattr(_Proxy, f"__{_op.__name__}__", _augmented(_op))


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


class ConcreteParamTracer(fx.Tracer):
    """Parameters and buffers read in `forward` are real tensors, not proxies (`concrete=False`:
    proxies, as plain fx traces them)."""

    def __init__(self, concrete: bool = True):
        super().__init__()
        self.concrete = concrete

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self.concrete else super().getattr(attr, attr_val, parameter_proxy_cache)

    def trace(self, root, concrete_args=None):
        self._names = None
        return super().trace(root, concrete_args)

    def create_arg(self, a):
        """A parameter or buffer becomes a get_attr node, found by identity in one dict (fx
        scans the whole model for each one: quadratic in the model's size)."""
        if isinstance(a, torch.Tensor) and isinstance(getattr(self, "root", None), nn.Module):
            if self._names is None:
                self._names = {}
                for name, t in [*self.root.named_parameters(), *self.root.named_buffers()]:
                    self._names.setdefault(id(t), name)
            name = self._names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a module with hooks is called as itself, so that its hooks fire
        return isinstance(m, BNAndPad) or (has_hooks(m) and qualname != "") or super().is_leaf_module(m, qualname)


def _none_defaults(model: nn.Module, given: int) -> dict:
    """forward's parameters after the first `given` that default to None: traced as None (fx
    then checks at call time that they are), not as tensors that `if scale is not None` takes."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: None for p in params[given:]
            if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def symbolic(model: nn.Module, given: int = 1, recompile: bool = True, concrete: bool = True) -> fx.GraphModule:
    """`model` traced by fx and made mutation-free; `recompile=False` leaves the code stale
    for a caller that only reads the graph (the engine recompiles when it is done);
    `concrete=False`: as plain fx traces, parameters as get_attr proxies (fold_constants folds
    what they compute) and every argument a placeholder."""
    tracer = ConcreteParamTracer(concrete)
    tensors = [*model.parameters(), *model.buffers()]
    versions = [t._version for t in tensors]
    with _unchanged(model):
        with torch.no_grad(), _OpCounter() as ran:  # only ops on concrete tensors reach the counter
            graph = tracer.trace(model, concrete_args=(concrete and _none_defaults(model, given)) or None)
        # the constants fx stored on the root (`_tensor_constant<i>`), for the GraphModule to copy
        constants = {k: v for k, v in vars(model).items() if k.startswith("_tensor_constant")}
    for t, v in zip(tensors, versions):
        if t._version != v:  # a write into a concrete parameter ran once, at trace time
            raise mutation.Refused("forward writes one of the model's parameters or buffers in place")
    with _unchanged(model):
        vars(model).update(constants)
        gm = fx.GraphModule(model, graph, model.__class__.__name__)
    gm.graph.lint()  # a graph that reads an attribute it lacks is a failed trace, not a result
    # convs that forward runs on parameters alone (ECBSR's `rep_params()` in eval mode), computed
    # once here: the graph runs that many fewer at every call than the module
    gm.reparam_folded = ran.convs
    if mutation.functionalize(gm) and recompile:
        gm.recompile()
    return gm


@contextlib.contextmanager
def _unchanged(model: nn.Module):
    """Every module of `model` as it was before: tracing runs forward, and a forward that assigns
    its own attribute (SPAN's `self.mean = self.mean.type_as(x)`) would leave a Proxy there (fx
    also stores constants as `_tensor_constant<i>` on the root)."""
    saved = [(m, dict(m.__dict__), {k: dict(m.__dict__[k]) for k in ("_parameters", "_buffers", "_modules")})
             for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs, registries in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for k, entries in registries.items():
                attrs[k].clear()
                attrs[k].update(entries)


def _symbolic_either(model: nn.Module, given: int) -> fx.GraphModule:
    """`symbolic` with concrete parameters, else with parameters as proxies, as plain fx traces
    them: `self.cls_token.expand(x.shape[0], -1, -1)` (timm's ViT) takes no Proxy size on a real
    tensor. The first failure is the one raised."""
    try:
        return symbolic(model, given, recompile=False)
    except mutation.Refused:
        raise  # aliasing, not the tracer: proxies would not settle it
    except Exception as e:
        try:
            return symbolic(model, given, recompile=False, concrete=False)
        except Exception:
            raise e from None


@contextlib.contextmanager
def _quiet():
    """torch.export logs whole graphs when it gives up; the report carries the message instead."""
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch.export", "torch._export",
                                               "torch.fx.experimental.symbolic_shapes", "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def exported(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """torch.export's functional ATen graph (every size dynamic that the model lets be; the
    module's `reparam_static` lists the input sizes it fixed), unlifted into a module."""
    inputs = tuple(example_inputs)
    auto = tree_map(lambda t: {i: torch.export.Dim.AUTO for i in range(t.dim())}
                    if isinstance(t, torch.Tensor) else None, inputs)
    with torch.no_grad(), _quiet():
        try:
            ep = torch.export.export(model, inputs, dynamic_shapes=auto, strict=False)
        except Exception:  # a model that only traces with fixed sizes
            ep = torch.export.export(model, inputs, strict=False)
        ep = ep.run_decompositions({})
    gm = ep.module()
    for m in gm.modules():  # traced in eval mode; its .eval() refuses to run, so say it directly
        m.training = False
    _drop_assertions(gm)
    _canonical_batch_norm(gm)
    for n in gm.graph.nodes:
        if mutation.written(n, {}) is not None and not _copy_at_end(n):
            raise mutation.Refused(f"the exported graph still writes in place at '{n.name}'")
    gm.reparam_guards = _guards_failed(gm, inputs, ep.range_constraints)
    gm.reparam_static = _static_sizes(gm, ep.range_constraints, bool(gm.reparam_guards))
    return gm


def _drop_assertions(gm: fx.GraphModule):
    """Erase export's own checks (`_assert_tensor_metadata`, `_assert_scalar`,
    `sym_constrain_range`, ...): they read a value without using it, so rules would count them as
    readers (a conv "also used elsewhere" keeps its BN); they only check what the trace saw."""
    for n in reversed(list(gm.graph.nodes)):
        name = n.target._overloadpacket.__name__ if isinstance(n.target, torch._ops.OpOverload) else ""
        if n.op == "call_function" and not n.users and \
                (name.startswith(("_assert_", "sym_constrain_range")) or name == "_functional_assert_async"):
            gm.graph.erase_node(n)


def _copy_at_end(node: fx.Node) -> bool:
    """node is one of the `copy_` writes of inputs/buffers that end an unlifted exported graph."""
    n = node
    while n.op != "output":
        if not (n.op == "call_function" and n.target is aten.copy_.default):
            return False
        n = n.next
    return True


def _static_sizes(gm: fx.GraphModule, ranges: dict, guarded: bool = False) -> list[tuple]:
    """The input shapes of an exported graph ('*' for a size it lets vary freely, 'lo..hi' for a
    size it bounds) where it fixes or bounds a size other than the channel count (dim 1) or has
    `guarded` sizes, else []."""
    def size(s):
        if is_concrete_int(s):
            return int(s)
        vr = ranges.get(s.node.expr)
        lo, hi = (vr.lower, vr.upper) if vr is not None else (2, None)
        bounded = vr is not None and (vr.upper != int_oo or int(lo) > 2)
        return f"{lo}..{hi}" if bounded else "*"

    shapes = []
    for n in gm.graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            shapes.append(tuple(size(s) for s in val.shape))
    fixed = any(s != "*" for shape in shapes for i, s in enumerate(shape) if i != 1 or len(shape) < 2)
    return shapes if fixed or guarded else []


def _guards_failed(gm: fx.GraphModule, inputs: tuple, ranges: dict) -> list[str]:
    """The guards of an exported graph (conditions its trace took on the input sizes, such as
    `x.size()[2] // 2 == 1`, which the range constraints do not show) that fail at other sizes:
    each free size, alone and all together, grown by 1 to 4 within its range."""
    guards = getattr(gm, "_guards_fn", None)
    places = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = tree_leaves(inputs)
    if guards is None or len(places) != len(leaves):
        return []
    hints = {}  # each free size's value in the example
    for val, t in zip(places, leaves):
        if isinstance(val, torch.Tensor) and isinstance(t, torch.Tensor):
            for s, n in zip(val.shape, t.shape):
                if not is_concrete_int(s) and s.node.expr.is_Symbol:
                    hints[s.node.expr] = n
    groups = [list(hints)] + ([[s] for s in hints] if len(hints) > 1 else [])
    failed = []
    for d in (1, 2, 3, 4):
        for grown in groups:
            values = {s: n + d if s in grown and (s not in ranges or n + d <= ranges[s].upper) else n
                      for s, n in hints.items()}
            try:
                guards(*[torch.empty([int(s) if is_concrete_int(s) else int(s.node.expr.subs(values))
                                      for s in val.shape], dtype=val.dtype, device="meta")
                         if isinstance(val, torch.Tensor) else t for val, t in zip(places, leaves)])
            except Exception as e:  # a guard failed (or a size the probe could not make)
                message = str(e).removeprefix("Guard failed: ")
                if message not in failed:
                    failed.append(message)
    return failed


def _canonical_batch_norm(gm: fx.GraphModule):
    """`_native_batch_norm_legit_no_training(...)[0]` (decomposed eval BN) as `aten.batch_norm`."""
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten._native_batch_norm_legit_no_training.default:
            continue
        users = list(n.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
            continue
        x, w, b, mean, var, momentum, eps = (list(n.args) + [None] * 7)[:7]
        with graph.inserting_before(n):
            bn = graph.call_function(aten.batch_norm.default, (x, w, b, mean, var, False, momentum, eps, False))
        bn.meta.update(users[0].meta if users else n.meta)
        for u in users:
            u.replace_all_uses_with(bn)
            graph.erase_node(u)
        graph.erase_node(n)
    gm.recompile()


def trace(model: nn.Module, example_inputs=None,
          front_ends=("fx", "export")) -> tuple[fx.GraphModule | None, list[str]]:
    """(mutation-free graph module in eval mode, the messages of the front ends that failed
    before), or (None, every front end's message). `front_ends`: which to try, in order
    (torch.export only with example inputs)."""
    errors = []
    if "fx" in front_ends:
        try:
            given = len(example_inputs) if example_inputs is not None else 1
            return _symbolic_either(model, given).eval(), []
        except Exception as e:  # any tracer failure means: try the next front end
            errors.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {_first_line(e)}")
    if "export" in front_ends and example_inputs is not None:
        try:  # an exported module is traced in eval mode and refuses .train()/.eval()
            return exported(model, example_inputs), errors
        except Exception as e:
            errors.append(f"torch.export: {type(e).__name__}: {_first_line(e)}")
    return None, errors


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
