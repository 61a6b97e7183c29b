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
import inspect
import textwrap

import torch
from torch import nn


def observe(module: nn.Module, inputs) -> tuple[dict[str, tuple], set[int]]:
    """Run `module(*inputs)` once: (the arguments of each direct child called exactly once,
    the ids of the modules in the tree used as collections: some child of theirs was called
    while they were not running)."""
    parent = {}
    for p in module.modules():
        for c in p.children():
            parent.setdefault(id(c), p)
    running, calls, loose = [], {}, set()
    names = {id(c): name for name, c in module.named_children()}

    def pre(m, args, kwargs):
        up = parent.get(id(m))
        if up is not None and up is not module and all(r is not up for r in running):
            loose.add(id(up))
        if up is module and id(m) in names:  # keyword arguments: not replayable as example inputs
            calls.setdefault(names[id(m)], []).append(None if kwargs else args)
        running.append(m)

    def post(m, args, out):
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
    # a module between `module` and one used as a collection is reached into as well
    for m in list(module.modules()):
        if id(m) in loose:
            up = parent.get(id(m))
            while up is not None and up is not module:
                loose.add(id(up))
                up = parent.get(id(up))
    return {name: c[0] for name, c in calls.items() if len(c) == 1 and c[0] is not None}, loose


# how a parent uses a child: (levels, tail). levels = how many levels down it is a collection
# (0: called whole); below them the elements are called ("call") or, where the parent reaches
# in by an attribute (`self.body.features(x)`), their own class's source decides ("source")
WHOLE, UNKNOWN = (0, "call"), (99, "source")


def from_source(module: nn.Module) -> dict[str, tuple[int, str]]:
    """How `module`'s class source uses each direct child (see WHOLE); construction in
    `__init__` aside. A child the source never names as `self.<name>` (reached by getattr or
    `self.children()`), or every child where the source cannot be read: UNKNOWN."""
    names = [name for name, _ in module.named_children()]
    if type(module) in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return dict.fromkeys(names, WHOLE)  # torch's containers call each child whole
    uses: dict[str, list] = {}
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") or cls is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            return dict.fromkeys(names, UNKNOWN)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name not in ("__init__", "extra_repr") \
                    and fn.args.args:
                _Uses(fn, module, set(names)).into(uses)
    return {name: max(uses[name]) if name in uses else UNKNOWN for name in names}


class _Uses:
    """The uses of `self.<child>` in one method, each followed through subscripts and loops."""

    def __init__(self, fn, module, names):
        self.fn, self.module, self.names, self.me = fn, module, names, fn.args.args[0].arg
        self.calls = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
        self.parent = {id(c): n for n in ast.walk(fn) for c in ast.iter_child_nodes(n)}

    def into(self, uses: dict):
        for n in ast.walk(self.fn):
            if isinstance(n, ast.Attribute) and n.attr in self.names and isinstance(n.value, ast.Name) \
                    and n.value.id == self.me and isinstance(n.ctx, ast.Load):
                uses.setdefault(n.attr, []).append(self.use(n, n.attr))

    def use(self, e, child: str, depth: int = 0) -> tuple[int, str]:
        if depth > 8:
            return UNKNOWN
        if id(e) in self.calls:
            return WHOLE
        up = self.parent.get(id(e))
        if isinstance(up, ast.Subscript) and up.value is e:
            return self.deeper(self.use(up, child, depth + 1))
        if isinstance(up, ast.Attribute) and up.value is e:
            return WHOLE if _plain_data(self.module, child, up.attr) and depth == 0 else (1, "source")
        if isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id == "len":
            return WHOLE  # its size only
        loop, var = self.loop_over(e, up)
        if loop is not None:
            names = [n for stmt in loop.body for n in ast.walk(stmt)
                     if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load)]
            return self.deeper(max([self.use(n, child, depth + 1) for n in names] or [WHOLE]))
        return UNKNOWN  # passed on, zipped, returned: not followed

    def loop_over(self, e, up):
        """(the for loop, its element variable) where `e` is what the loop iterates
        (also through `enumerate(e)`), else (None, None)."""
        if isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id == "enumerate" \
                and up.args and up.args[0] is e:
            loop = self.parent.get(id(up))
            target = loop.target if isinstance(loop, ast.For) and loop.iter is up else None
            if isinstance(target, ast.Tuple) and len(target.elts) == 2 and isinstance(target.elts[1], ast.Name):
                return loop, target.elts[1].id
            return None, None
        if isinstance(up, ast.For) and up.iter is e and isinstance(up.target, ast.Name):
            return up, up.target.id
        return None, None

    @staticmethod
    def deeper(use: tuple[int, str]) -> tuple[int, str]:
        return min(use[0] + 1, UNKNOWN[0]), use[1]


def _plain_data(module: nn.Module, child: str, attr: str) -> bool:
    """`module.<child>.<attr>` is plain data (a fused child keeps those), not a method,
    submodule or tensor."""
    missing = object()
    value = getattr(getattr(module, child, None), attr, missing)
    return isinstance(value, (int, float, str, bool, tuple, type(None)))
