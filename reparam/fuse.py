"""`fuse`: model → fx graph → rewritten graph → module + report."""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import engine, trace
from .ops import common_scope, where
from .report import Report, Skip, Untraced
from .stats import count
from .testing import rel_error


def _check(model, example_inputs):
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparam.fuse expects a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tensor or a tuple of the forward's arguments, "
                        f"got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def fuse_with_report(model: nn.Module, example_inputs=None, *, inplace: bool = False,
                     max_macs_ratio: float = 1.0) -> tuple[nn.Module, Report]:
    """Fuse `model` (see `fuse`) and say what was done, what was left alone and why."""
    inputs = _check(model, example_inputs)
    report = Report()
    if model.training:
        report.notes.append("the model was in training mode: fused its eval-mode function "
                            "(BatchNorm running statistics)")
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    with torch.no_grad():
        try:
            report.before = count(work, inputs)
        except Exception as e:
            raise ValueError(f"reparam: the model fails on the example inputs "
                             f"{[tuple(getattr(t, 'shape', ())) for t in inputs]}: {e}") from e
        expected = work(*inputs) if inputs is not None else None
        fused = _fuse(work, inputs, "", report, max_macs_ratio)
        _fast_lookup(fused)
        report.after = count(fused, inputs)
        if inputs is not None:
            report.max_rel_error = rel_error(expected, fused(*inputs))
    return fused, report


def fuse(model: nn.Module, example_inputs=None, *, inplace: bool = False,
         max_macs_ratio: float = 1.0) -> nn.Module:
    """An eval-mode module computing `model`'s eval-mode function with as few convs as is exact.

    model: any nn.Module; it is not modified unless `inplace=True`.
    example_inputs: optional tuple of forward arguments; they let `torch.export` trace models
    that `torch.fx.symbolic_trace` cannot, and give shapes to rules that need them.
    max_macs_ratio: a merge may cost at most this times the multiply-accumulates of the ops it
    replaces (1.0: never slower in MACs, so a depthwise k×k then a 1×1, or a bottleneck of
    1×1s, stay as they are; float('inf'): as few convolutions as is exact, whatever they cost).
    Returns a torch.fx.GraphModule, or, where the whole model cannot be traced, a copy whose
    traceable submodules are fused."""
    return fuse_with_report(model, example_inputs, inplace=inplace, max_macs_ratio=max_macs_ratio)[0]


def explain(model: nn.Module, example_inputs=None, *, max_macs_ratio: float = 1.0) -> Report:
    """The report of `fuse_with_report` (with example inputs: the max relative error too)."""
    return fuse_with_report(model, example_inputs, max_macs_ratio=max_macs_ratio)[1]


def _fuse(module: nn.Module, inputs, path: str, report: Report, ratio: float, scopes=None) -> nn.Module:
    """Fuse `module` (at `path`) as one graph, else each child. `scopes`: where a graph of the
    whole model merged ops of different children (None: not known yet)."""
    prefix = f"{path}." if path else ""
    exportable = inputs if scopes is None or path in scopes else None
    gm, errors = trace.trace(module, exportable)
    outcome = None
    if gm is not None and errors and list(module.children()):
        # torch.export's graph runs slower than eager glue code: keep it only where it merged
        # ops of different children; elsewhere fusing each child alone gives the same
        outcome = _run(gm, inputs, path, report, ratio)
        found = {prefix + s if s else path for s in _merge_scopes(gm)}
        scopes = found if scopes is None else scopes | found
        if path not in scopes:
            gm, outcome = None, None
    if gm is None:
        children = list(module.named_children())
        report.untraced.append(Untraced(path or "<root>", "; ".join(errors)))
        child_inputs = _capture_inputs(module, inputs) if inputs is not None else {}
        for name, child in children:
            sub = f"{path}.{name}" if path else name
            setattr(module, name, _fuse(child, child_inputs.get(name), sub, report, ratio, scopes))
        return module
    outcome = outcome or _run(gm, inputs, path, report, ratio)
    for name, value in vars(module).items():  # what the caller may read: `self.attn.resolution`
        if not (name.startswith("_") or name == "training" or name in vars(gm)
                or isinstance(value, (nn.Module, torch.Tensor))):
            setattr(gm, name, value)
    report.rewrites += [replace(a, path=prefix + a.path) for a in outcome.applied]
    report.skipped += [Skip(r.rule, prefix + where(r.node), r.reason) for r in outcome.refused]
    return gm


def _run(gm: fx.GraphModule, inputs, path: str, report: Report, ratio: float) -> engine.Outcome:
    if inputs is not None and not any("val" in n.meta for n in gm.graph.nodes):
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as e:  # shapes only sharpen a few checks; rules refuse without them
            report.notes.append(f"shape propagation failed at '{path or '<root>'}': {e}")
    return engine.run(gm, max_macs_ratio=ratio)


def _merge_scopes(gm: fx.GraphModule) -> set[str]:
    """For each conv made while fusing `gm`, the deepest module holding all the ops it stands
    for: the module whose own forward combines them."""
    return {common_scope(n.meta["reparam_paths"]) for n in gm.graph.nodes
            if n.meta.get("reparam_new") and n.meta.get("reparam_paths")}


def _fast_lookup(model: nn.Module):
    """Each submodule also in its parent's instance dict, so the generated `self.a.b.conv(x)`
    is plain attribute lookup rather than one `nn.Module.__getattr__` call per level (about 7%
    of RepViT-M0.9's latency at 64×64 on CPU). State dicts and names are unchanged, and
    assigning a new submodule replaces the alias (nn.Module.__setattr__ clears it first)."""
    for m in model.modules():
        for name, child in m._modules.items():
            if child is not None:
                object.__setattr__(m, name, child)


def _capture_inputs(module: nn.Module, inputs) -> dict[str, tuple]:
    """The arguments each direct child gets in one forward, for children called exactly once."""
    seen: dict[str, list] = {}
    hooks = [child.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args))
             for name, child in module.named_children()]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return {name: calls[0] for name, calls in seen.items() if len(calls) == 1}
