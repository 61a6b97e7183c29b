"""How a module whose forward is kept (it could not be traced) uses its children.

A child may be replaced by its fused graph only where the parent calls it as a whole. A parent
that iterates or indexes a child (`for m in self.blocks[i]`), calls one of its methods
(`self.body.features(x)`) or reaches into it (`self.body.conv(x)`) uses it as a collection: the
child keeps its class and its Python code, and its own children are fused instead.
With example inputs this is observed (a call of a module while its parent is not running);
without them it is read from the parent class's source (`from_source`).
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_leaves


@dataclass
class Observation:
    """One forward of a module on example inputs, seen from its tree (see `observe`).

    Attributes:
        args: the arguments of each module called exactly once, positionally, by id.
        loose: the ids of the modules used as collections: a child of theirs was called while
            they were not running.
        flows: for each module called exactly once, by id, (the ids of the tensors it read,
            the ids of the tensors it returned, their shapes); the tensors were all alive
            together, so the ids tell them apart.
    """
    args: dict = field(default_factory=dict)
    loose: set = field(default_factory=set)
    flows: dict = field(default_factory=dict)


def observe(module: nn.Module, inputs) -> Observation:
    """Run `module(*inputs)` once and watch each module of its tree (see Observation)."""
    parents = {}  # a module may be the child of several (Ultralytics' Conv shares one SiLU)
    for p in module.modules():
        for c in p.children():
            parents.setdefault(id(c), []).append(p)
    parent = {k: ups[0] for k, ups in parents.items()}
    running, calls, flows, seen = [], {}, {}, Observation()
    alive = []  # every tensor seen, until the forward ends: no id is reused meanwhile

    def tensors(value):
        found = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        alive.extend(found)
        return {id(t) for t in found}

    def pre(m, args, kwargs):
        ups = [up for up in parents.get(id(m), []) if up is not module]
        if ups and len(ups) == len(parents[id(m)]) and not any(r is up for r in running for up in ups):
            # called while its parent is not running: the parent is a collection, and so is each
            # module between it and the nearest running one (`self.body.features[i](x)`)
            live = {id(r) for r in running}
            for up in ups:
                while up is not None and up is not module and id(up) not in live:
                    seen.loose.add(id(up))
                    up = parent.get(id(up))
        # keyword arguments: not replayable as example inputs
        calls.setdefault(id(m), []).append(None if kwargs else args)
        flows[id(m)] = (tensors((args, kwargs)), set(), [])
        running.append(m)

    def post(m, args, out):
        flows[id(m)][1].update(tensors(out))
        flows[id(m)][2].extend(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        if running and running[-1] is m:
            running.pop()

    hooks = []
    for m in module.modules():
        if m is not module:
            hooks += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    once = {key for key, c in calls.items() if len(c) == 1}
    seen.args = {key: calls[key][0] for key in once if calls[key][0] is not None}
    seen.flows = {key: flows[key] for key in once}
    return seen


# how a parent uses a child: (levels, tail). levels = how many levels down it is a collection
# (0: called whole); below them the elements are called ("call") or, where the parent reaches
# in by an attribute (`self.body.features(x)`), their own class's source decides ("source").
# A child fused whole keeps its class, methods and plain attributes (see fuse._dressed), so
# reading `m.f`, comparing it, or passing it to a function is a use as a whole; only iterating,
# indexing and reaching into it (a method, a submodule, a weight) make it a collection.
# UNKNOWN (never named, returned, stored): it keeps its class and code, its own source decides
WHOLE, UNKNOWN = (0, "call"), (1, "source")

# builtins that only look at a module as a whole
_WHOLE_BUILTINS = {"len", "isinstance", "type", "id", "hasattr", "callable", "repr", "str", "print"}
# builtins that iterate their argument
_ITERATORS = {"list", "tuple", "iter", "reversed", "sorted", "map", "filter", "zip", "enumerate"}


def from_source(module: nn.Module) -> dict[str, tuple[int, str]]:
    """How `module`'s class source uses each direct child (see WHOLE), in the methods its
    forward reaches (through `self.<method>`) and its overrides of nn.Module's own methods
    (`_apply`, which `.to()` calls). A child the source never names as `self.<name>` (reached by
    getattr or `self.children()`), or every child where the source cannot be read: UNKNOWN."""
    names = [name for name, _ in module.named_children()]
    if type(module) in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return dict.fromkeys(names, WHOLE)  # torch's containers call each child whole
    methods = _methods(type(module))
    if methods is None:
        return dict.fromkeys(names, UNKNOWN)
    uses: dict[str, list] = {}
    for fn in _reached(methods):
        if fn.args.args:
            _Uses(fn, module, set(names), methods).into(uses)
    return {name: max(uses[name]) if name in uses else UNKNOWN for name in names}


@functools.cache
def _methods(cls: type) -> dict[str, ast.FunctionDef] | None:
    """The methods of `cls` and its bases outside torch.nn, by name (the most derived one), parsed
    once per class; None where a source cannot be read."""
    methods = {}
    for c in reversed(cls.__mro__):
        if c.__module__.startswith("torch.nn") or c is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(c)))
        except (OSError, TypeError, SyntaxError):
            return None
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        methods.update({fn.name: fn for fn in body if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))})
    return methods


def _reached(methods: dict) -> list:
    """`forward`, the methods it reaches through `self.<name>`, and overrides of nn.Module's own
    methods (torch calls those: `.to()` runs `_apply`)."""
    todo = [name for name in methods if name == "forward" or (name in vars(nn.Module) and name != "__init__")]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in methods:
            continue
        seen.add(name)
        fn = methods[name]
        me = fn.args.args[0].arg if fn.args.args else None
        todo += [n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                 and n.value.id == me and n.attr in methods]
    return [methods[name] for name in methods if name in seen]


class _Uses:
    """The uses of `self.<child>` in one method, each followed through subscripts, loops,
    assignments to a name and calls of the class's own methods."""

    def __init__(self, fn, module, names, methods, seen=()):
        self.fn, self.module, self.names, self.methods = fn, module, names, methods
        self.me = fn.args.args[0].arg
        self.seen = (*seen, fn.name)
        self.calls = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
        self.parent = {id(c): n for n in ast.walk(fn) for c in ast.iter_child_nodes(n)}

    def into(self, uses: dict):
        for n in ast.walk(self.fn):
            if isinstance(n, ast.Attribute) and n.attr in self.names and isinstance(n.value, ast.Name) \
                    and n.value.id == self.me and isinstance(n.ctx, ast.Load):
                uses.setdefault(n.attr, []).append(self.use(n, [getattr(self.module, n.attr)]))

    def use(self, e, objs: list, depth: int = 0) -> tuple[int, str]:
        """How the expression `e`, one of the modules `objs`, is used."""
        if depth > 8:
            return UNKNOWN
        if id(e) in self.calls:
            return WHOLE
        up = self.parent.get(id(e))
        below = [c for o in objs for c in o.children()]
        if isinstance(up, ast.Subscript) and up.value is e:
            if isinstance(up.slice, ast.Slice):  # `self.model[:-1]`: the same container, shorter
                return self.use(up, objs, depth + 1)
            return self.deeper(self.use(up, below, depth + 1))
        if isinstance(up, ast.Attribute) and up.value is e:
            return WHOLE if _plain_data(objs, up.attr) else (1, "source")
        if isinstance(up, ast.Compare):
            return WHOLE  # `m is self.model[-1]`
        if isinstance(up, ast.Assign) and up.value is e and len(up.targets) == 1 \
                and isinstance(up.targets[0], ast.Name):
            return self.named(self.fn, up.targets[0].id, objs, depth)
        if isinstance(up, ast.Call) and e in up.args:
            func = up.func
            if isinstance(func, ast.Name) and func.id in _WHOLE_BUILTINS:
                return WHOLE
            if isinstance(func, ast.Name) and func.id in _ITERATORS:
                loop, var = self.loop_over(e, up)
                if loop is None:
                    return self.deeper(UNKNOWN)
                return self.deeper(self.named(loop, var, below, depth + 1))
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == self.me:
                return self.into_method(func.attr, up.args.index(e), objs, depth)
            return WHOLE  # passed to a function: it gets the module with its class and attributes
        loop, var = self.loop_over(e, up)
        if loop is not None:
            return self.deeper(self.named(loop, var, below, depth + 1))
        if isinstance(up, (ast.List, ast.Tuple)) and isinstance(up.ctx, ast.Load):  # `for m in [self.a, self.b]`
            loop, var = self.loop_over(up, self.parent.get(id(up)))
            if loop is not None:
                return self.named(loop, var, objs, depth + 1)
        return UNKNOWN  # returned, stored, starred: not followed

    def named(self, scope, var: str, objs: list, depth: int) -> tuple[int, str]:
        """The uses of the name `var` within `scope`: a for loop's body, a comprehension's element
        and conditions, or a whole method."""
        if isinstance(scope, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            parts = [getattr(scope, f) for f in ("elt", "key", "value") if hasattr(scope, f)]
            parts += [c for g in scope.generators for c in g.ifs]
        else:
            parts = scope.body
        names = [n for part in parts for n in ast.walk(part)
                 if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load)]
        return max([self.use(n, objs, depth) for n in names] or [WHOLE])

    def into_method(self, name: str, index: int, objs: list, depth: int) -> tuple[int, str]:
        """Passed to `self.<name>(...)`: how that method uses its parameter."""
        fn = self.methods.get(name)
        if fn is None or name in self.seen or index + 1 >= len(fn.args.args):
            return UNKNOWN
        inner = _Uses(fn, self.module, self.names, self.methods, self.seen)
        return inner.named(fn, fn.args.args[index + 1].arg, objs, depth + 1)

    def loop_over(self, e, up):
        """(the loop or comprehension, its element variable) where `e` is what it iterates (also
        through `enumerate(...)` and `zip(..., e, ...)`, nested), else (None, None)."""
        path = []  # where e's element sits in the loop target: `for i, (m, n) in enumerate(zip(a, e))`
        while isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id in ("enumerate", "zip") \
                and e in up.args:
            path.insert(0, 1 if up.func.id == "enumerate" else up.args.index(e))
            e, up = up, self.parent.get(id(up))
        if isinstance(up, (ast.For, ast.comprehension)) and up.iter is e:
            target = up.target
            for index in path:
                target = target.elts[index] if isinstance(target, ast.Tuple) and index < len(target.elts) else None
            if isinstance(target, ast.Name):
                return (up if isinstance(up, ast.For) else self.parent.get(id(up))), target.id
        return None, None

    @staticmethod
    def deeper(use: tuple[int, str]) -> tuple[int, str]:
        return min(use[0] + 1, 99), use[1]


def _plain_data(objs: list, attr: str) -> bool:
    """`<obj>.<attr>` is plain data (a fused module keeps those) for each of `objs`, not a
    method, submodule, parameter or buffer."""
    missing = object()
    for o in objs:
        value = getattr(o, attr, missing)
        if value is missing:
            continue
        if isinstance(value, torch.Tensor):
            if attr in o._parameters or attr in o._buffers:
                return False
        elif not isinstance(value, (int, float, str, bool, tuple, list, dict, set, frozenset, type(None))):
            return False
    return True
