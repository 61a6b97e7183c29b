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

    def pre(m, args):
        up = parent.get(id(m))
        if up is not None and up is not module and all(r is not up for r in running):
            loose.add(id(up))
        if up is module and id(m) in names:
            calls.setdefault(names[id(m)], []).append(args)
        running.append(m)

    def post(m, args, out):
        if running and running[-1] is m:
            running.pop()

    hooks = []
    for m in module.modules():
        if m is not module:
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
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
    return {name: c[0] for name, c in calls.items() if len(c) == 1}, loose


def from_source(module: nn.Module) -> tuple[set[str], set[str]]:
    """(the direct children that `module`'s class source does not only call as `self.<name>(...)`,
    those of them whose elements are themselves not only called: `for m in self.blocks[i]`).
    Construction in `__init__` aside; where the source cannot be read, every child."""
    names = {name for name, _ in module.named_children()}
    if type(module) in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return set(), set()  # torch's containers call each child whole (or are iterated by their parent)
    called, other, deep = set(), set(), set()
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") or cls is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            return names, names  # no source: nothing can be assumed
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name not in ("__init__", "extra_repr") \
                    and fn.args.args:
                _scan(fn, fn.args.args[0].arg, module, names, called, other, deep)
    return (names - called) | other, deep


def _scan(fn, me: str, module, names, called, other, deep):
    """Sort the uses of `me.<child>` in function `fn` into called / other; `deep`: children whose
    elements (loop variables over them, their items) are used other than by a call."""
    calls = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
    parent = {id(c): n for n in ast.walk(fn) for c in ast.iter_child_nodes(n)}
    element_vars: dict[str, str] = {}
    for n in ast.walk(fn):
        if not (isinstance(n, ast.Attribute) and n.attr in names and isinstance(n.value, ast.Name)
                and n.value.id == me and isinstance(n.ctx, ast.Load)):
            continue
        up = parent.get(id(n))
        if id(n) in calls:
            called.add(n.attr)
            continue
        other.add(n.attr)
        if isinstance(up, ast.Attribute) and _plain_data(module, n.attr, up.attr):
            other.discard(n.attr)
            called.add(n.attr)
        elif isinstance(up, ast.Subscript):  # self.blocks[i]: called, or itself a collection
            if id(up) not in calls:
                deep.add(n.attr)
        elif isinstance(up, ast.For) and up.iter is n and isinstance(up.target, ast.Name):
            element_vars[up.target.id] = n.attr
        elif isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id in ("enumerate", "zip", "reversed"):
            deep.add(n.attr)  # elements reached through a helper: not followed
    for var, child in element_vars.items():
        for n in ast.walk(fn):
            if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load) and id(n) not in calls:
                deep.add(child)


def _plain_data(module: nn.Module, child: str, attr: str) -> bool:
    """`module.<child>.<attr>` is plain data (a fused child keeps those), not a method,
    submodule or tensor."""
    missing = object()
    value = getattr(getattr(module, child, None), attr, missing)
    return isinstance(value, (int, float, str, bool, tuple, type(None)))
