"""How a module whose forward is kept (it could not be traced) uses its children.

A child may be replaced by its fused graph only where the parent calls it as a whole. A parent
that iterates or indexes a child (`for m in self.blocks[i]`), calls one of its methods
(`self.body.features(x)`) or reaches into it (`self.body.conv(x)`) uses it as a collection: the
child keeps its class and its Python code, and its own children are fused instead.
With example inputs this is observed (a call of a descendant while its parent is not running);
without them it is read from the parent class's source, and a child the source never calls
as `self.<name>(...)` counts as a collection.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

import torch
from torch import nn


def observe(module: nn.Module, inputs) -> tuple[dict[str, tuple], set[str]]:
    """Run `module(*inputs)` once: (the arguments of each direct child called exactly once,
    the names of the direct children used as collections)."""
    top, parent = {}, {}
    for name, child in module.named_children():
        for m in child.modules():
            top.setdefault(m, name)
        parent.setdefault(child, module)
        for p in child.modules():
            for c in p.children():
                parent.setdefault(c, p)
    running, calls, loose = [], {}, set()

    def pre(m, args):
        if m is not module and parent.get(m) is not module and parent.get(m) not in running:
            loose.add(top[m])
        if parent.get(m) is module:
            calls.setdefault(top[m], []).append(args)
        running.append(m)

    def post(m, args, out):
        if running and running[-1] is m:
            running.pop()

    hooks = []
    for m in top:
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return {name: c[0] for name, c in calls.items() if len(c) == 1}, loose


def from_source(module: nn.Module) -> set[str]:
    """The direct children that `module`'s class source does not only call as `self.<name>(...)`
    (construction in `__init__` aside)."""
    names = {name for name, _ in module.named_children()}
    if type(module) in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return set()  # torch's containers call each child whole (or are iterated by their parent)
    called, other = set(), set()
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") or cls is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            return names  # no source: nothing can be assumed
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in ("__init__", "extra_repr"):
                continue
            calls = {id(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
            data = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                    and _plain_data(module, n.value.attr, n.attr)}  # self.child.<number or string>
            for n in ast.walk(fn):
                if isinstance(n, ast.Attribute) and n.attr in names and isinstance(n.value, ast.Name) \
                        and n.value.id == "self" and isinstance(n.ctx, ast.Load):
                    (called if id(n) in calls | data else other).add(n.attr)
    return (names - called) | other


def _plain_data(module: nn.Module, child: str, attr: str) -> bool:
    """`module.<child>.<attr>` is plain data (a fused child keeps those), not a method,
    submodule or tensor."""
    missing = object()
    value = getattr(getattr(module, child, None), attr, missing)
    return isinstance(value, (int, float, str, bool, tuple, type(None)))
