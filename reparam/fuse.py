"""`fuse`: model → fx graph → rewritten graph → module + report.

What `fuse` returns is checked before it is returned: every rewrite on probes (`check`), with
example inputs the whole model against the original (rewrites behind a difference are found by
bisection and left out), and always the result's tensors and calls (`_postcondition`).
"""
from __future__ import annotations

import copy
import math
import numbers
import re
import weakref
from dataclasses import replace

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_leaves, tree_map

from . import engine, trace, usage
from .ops import ADD, CAT, CONST_PREFIX, MUL, NEG, SUB, common_scope, module_path, where
from .report import Report, Skip, Untraced
from .stats import count, run_counted
from .testing import rel_error

# the whole-model check: a difference above this (relative to the output's largest magnitude)
# is a wrong rewrite, not rounding (float32 models fuse to 1e-7 .. 3e-6)
WHOLE_MODEL_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1}


class InternalError(RuntimeError):
    """reparam broke its own promise on this model; the message says where. Please report it."""


def _check(model, example_inputs, max_macs_ratio):
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparam.fuse expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("reparam.fuse cannot rewrite a TorchScript module: fuse the Python module, "
                        "then script the result")
    if isinstance(max_macs_ratio, bool) or not isinstance(max_macs_ratio, numbers.Real) \
            or math.isnan(max_macs_ratio) or max_macs_ratio <= 0:
        raise ValueError(f"max_macs_ratio must be a positive number (float('inf') for no limit), "
                         f"got {max_macs_ratio!r}")
    if example_inputs is None:
        lazy = [name for name, m in model.named_modules()
                if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
        if lazy:
            raise ValueError(f"reparam: module '{lazy[0] or '<root>'}' is a lazy module whose parameters are "
                             "not initialized yet: run one forward pass first, or pass example_inputs")
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tensor or a tuple of the forward's arguments, "
                        f"got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def fresh(inputs):
    """Clones of the tensors in `inputs`: no forward run by `fuse` writes the caller's tensors."""
    return None if inputs is None else tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def fuse_with_report(model: nn.Module, example_inputs: tuple | None = None, *, inplace: bool = False,
                     max_macs_ratio: float = 1.0) -> tuple[nn.Module, Report]:
    """Fuse `model` (see `fuse`) and say what was done, what was left alone and why.

    Args:
        model: as for `fuse`.
        example_inputs: as for `fuse`.
        inplace: as for `fuse`.
        max_macs_ratio: as for `fuse`.

    Returns:
        (fused, report): the module `fuse` returns and a `Report` (counts before and after, the
        rewrites, the places left alone with their reasons, notes, and with example inputs the
        measured max relative error).

    Raises:
        ValueError: as for `fuse`.
        reparam.InternalError: as for `fuse`.
    """
    inputs = _check(model, example_inputs, max_macs_ratio)
    _JUDGED.clear()  # judgements of this fuse only (with inplace=True the modules are the user's)
    training = model.training
    work = model if inplace else _copy(model)
    work.eval()
    with torch.no_grad():
        _prepare(work, inputs)
        on_meta = any(t.is_meta for t in [*tree_leaves(inputs), *work.parameters(), *work.buffers()]
                      if isinstance(t, torch.Tensor))
        if inputs is None or on_meta:  # nothing to compare (on meta: nothing is computed)
            fused, report = _fuse_report(work, inputs, max_macs_ratio, engine.Budget())
            report.before, report.after = count(work, fresh(inputs)), count(fused, fresh(inputs))
        else:
            args = fresh(inputs)
            try:
                before, out = run_counted(work, args)
            except Exception as e:
                raise ValueError(f"reparam: the model fails on the example inputs "
                                 f"{[tuple(getattr(t, 'shape', ())) for t in inputs]}: {e}") from e
            fused, report = _fuse_checked(work, inputs, (out, args), max_macs_ratio)
            report.before = before
        if training:
            report.notes.insert(0, "the model was in training mode: fused its eval-mode function "
                                   "(BatchNorm running statistics)")
    _postcondition(work, fused, inputs)
    report.norms_left = _norms_left(fused, report)
    return fused, report


def fuse(model: nn.Module, example_inputs: tuple | None = None, *, inplace: bool = False,
         max_macs_ratio: float = 1.0) -> nn.Module:
    """An eval-mode module computing `model`'s eval-mode function with as few convs as is exact.

    Args:
        model: any nn.Module; it is not modified unless `inplace=True`.
        example_inputs: optional tuple of forward arguments. They let `torch.export` trace models
            that `torch.fx.symbolic_trace` cannot, give shapes to rules that need them, and let
            `fuse` check the whole result against the model (rewrites behind a difference are
            left out). They are never written: every forward runs on clones.
        inplace: fuse `model` itself instead of a deep copy.
        max_macs_ratio: a merge may cost at most this times the multiply-accumulates of the ops
            it replaces (1.0: never slower in MACs, so a depthwise k×k then a 1×1, or a
            bottleneck of 1×1s, stay as they are; `math.inf`: as few convolutions as is exact).

    Returns:
        A `torch.fx.GraphModule` where a merge combines ops of different submodules; else a copy
        of `model` (same class and Python code) whose submodules are fused; `model`'s copy
        itself where nothing merges.

    Raises:
        ValueError: `max_macs_ratio` is not a positive number, the model holds uninitialized
            lazy modules, a ScriptModule is given example inputs, or the model fails on them.
        reparam.InternalError: a bug in reparam (a fused model that breaks its post-conditions
            is never returned).
    """
    return fuse_with_report(model, example_inputs, inplace=inplace, max_macs_ratio=max_macs_ratio)[0]


def explain(model: nn.Module, example_inputs: tuple | None = None, *, max_macs_ratio: float = 1.0) -> Report:
    """What `fuse` would do to `model`, without keeping the fused module.

    Args:
        model: as for `fuse`.
        example_inputs: as for `fuse`.
        max_macs_ratio: as for `fuse`.

    Returns:
        The `Report` of `fuse_with_report` (print it for a table; with example inputs it holds
        the max relative error too).
    """
    return fuse_with_report(model, example_inputs, max_macs_ratio=max_macs_ratio)[1]


def _norms_left(fused: nn.Module, report: Report) -> list[Skip]:
    """Each batch norm `fused` still holds, with the first reason the report gives for it: a
    refusal at it, at a sibling (`block.conv` for `block.bn`) or naming it (the conv before it
    has other readers), else the untraced module whose Python calls it, else that no rule saw
    an op to fold it into."""
    out = []
    for name, m in fused.named_modules():
        if not isinstance(m, _BN):
            continue
        scope = name.rpartition(".")[0]
        named = re.compile(rf"(?<![\w.]){re.escape(name)}(?![\w.])")
        why = next((s for s in report.skipped if s.path == name), None) \
            or next((s for s in report.skipped if s.path.rpartition(".")[0] == scope and scope), None) \
            or next((s for s in report.skipped if named.search(s.reason)), None)  # "6 ops read it (…bn…)"
        if why is not None:
            out.append(Skip(why.rule, name, f"{why.reason} (at {why.path})" if why.path != name else why.reason))
            continue
        up = max((u for u in report.untraced if _within(name, [u.path.replace("<root>", "")])),
                 key=lambda u: len(u.path), default=None)
        reason = (f"called by the Python of '{up.path}', which could not be traced ({up.message})" if up
                  else "no conv or linear op next to it in its graph")
        out.append(Skip("fuse", name, reason))
    return out


# ---- preparing the copy ----

def _norm_hooks(model: nn.Module):
    """(module, hook) for each legacy weight_norm / spectral_norm hook: a weight computed in a
    pre-hook from other parameters."""
    return [(m, h) for m in model.modules() for h in list(m._forward_pre_hooks.values())
            if isinstance(h, (WeightNorm, SpectralNorm))]


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy; the weights legacy weight_norm computes (not leaves: deepcopy refuses them)
    are copied as plain tensors, to be computed again in `_prepare`."""
    memo = {}
    for m, hook in _norm_hooks(model):
        t = getattr(m, hook.name, None)
        if isinstance(t, torch.Tensor) and not t.is_leaf:
            memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def _prepare(work: nn.Module, inputs):
    """Make the copy's weights plain: lazy modules initialized (one forward on the example
    inputs), legacy weight_norm / spectral_norm hooks turned into the weights they compute."""
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params() for m in work.modules()):
        work(*fresh(inputs))
    for m, hook in _norm_hooks(work):
        (remove_weight_norm if isinstance(hook, WeightNorm) else remove_spectral_norm)(m, hook.name)


# ---- the whole-model check ----

def _run(model, inputs):
    """(what one forward on fresh clones of `inputs` runs, (its output, those clones after it)):
    a model that writes its inputs must write them the same way fused."""
    args = fresh(inputs)
    stats, out = run_counted(model, args)
    return stats, (out, args)


def _fuse_checked(work: nn.Module, inputs, want, ratio: float):
    """_fuse, checked against the model's output `want` (and its inputs after the call) on the
    example inputs; rewrites behind a difference are found by bisection and left out."""
    tolerance = _tolerance(want[0])
    budget = engine.Budget()
    fused, report = _fuse_report(work, inputs, ratio, budget)
    notes = []
    for attempt in range(9):  # at most 8 rewrites undone
        report.notes = notes + report.notes
        try:
            report.after, got = _run(fused, inputs)
        except Exception as e:  # a wrong rewrite: infinitely wrong
            failure, error = f"fails on the example inputs ({type(e).__name__}: {trace._first_line(e)})", math.inf
        else:
            report.max_rel_error, error = _differ(want[0], got[0]), _differ(want, got)
            failure = f"differs from the model on the example inputs (rel err {error:.2g})"
            if error <= tolerance:
                return fused, report
        if attempt == 0 and math.isfinite(error) and _differ(want, _run(work, inputs)[1]) > tolerance:
            report.notes.append("the model's outputs change from call to call: fused without the whole-model check")
            return fused, report
        exact = _float64_error(work, fused, inputs) if math.isfinite(error) else None
        if exact is not None and exact <= tolerance:
            # rounding the model's dtype does, amplified where the output is discontinuous (a
            # top-k or argmax flips on a near tie): the same computation in float64 agrees
            report.notes.append(f"the outputs differ by a relative {error:.2g} in {_dtypes(want[0])} but agree "
                                f"in float64 (rel err {exact:.2g}): the model's output is discontinuous "
                                "(top-k, argmax, sort or a threshold) at these inputs, and rounding moves it")
            return fused, report
        culprit = _bisect(work, inputs, ratio, budget, want, tolerance) if attempt < 8 else None
        if culprit is None:
            break
        budget.blocked.add(culprit.key)
        notes = report.notes + [f"undone: {culprit.rule} at {culprit.path}: with it the fused model {failure} "
                                "— please report"]
        fused, report = _fuse_report(work, inputs, ratio, engine.Budget(blocked=set(budget.blocked)))
    report.notes.append(f"the fused model {failure} and no rewrite explains it: returned the model unfused "
                        "— please report")
    report.rewrites, report.max_rel_error = [], 0.0
    report.after = count(work, fresh(inputs))
    return work, report


def _differ(expected, got) -> float:
    """The relative error between two outputs (inf where their structure, shapes or dtypes differ)."""
    exp = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    act = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(exp) != len(act) or any(a.dtype != b.dtype or a.shape != b.shape for a, b in zip(exp, act)):
        return math.inf
    err = rel_error(exp, act)
    return err if math.isfinite(err) else math.inf


def _float64_error(model: nn.Module, fused: nn.Module, inputs) -> float | None:
    """The relative error of `fused` against `model`, both run in float64 (copies, on the same
    inputs in float64); None where either fails in float64 (a dtype fixed in its code)."""
    def wide(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    try:
        a, b = copy.deepcopy(model).double(), copy.deepcopy(fused).double()
        args = tree_map(wide, inputs)
        return _differ(a(*fresh(args)), b(*fresh(args)))
    except Exception:  # not computable in float64: the check in the model's dtype stands
        return None


def _dtypes(out) -> str:
    return "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in tree_leaves(out)
                            if isinstance(t, torch.Tensor) and t.is_floating_point()}))


def _tolerance(expected) -> float:
    dtypes = [t.dtype for t in tree_leaves(expected) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max([WHOLE_MODEL_TOLERANCE.get(d, 1e-4) for d in dtypes] or [0.0])


def _bisect(work, inputs, ratio, budget, want, tolerance):
    """The first applied rewrite after which the fused model differs from `want`, or None."""
    def wrong(limit):  # fused with the first `limit` rewrites (in the order they are applied)
        run = engine.Budget(limit, set(budget.blocked))
        fused, _ = _fuse_report(work, inputs, ratio, run)
        try:
            return _differ(want, _run(fused, inputs)[1]) > tolerance, run.log
        except Exception:  # fails where the model runs: wrong
            return True, run.log

    bad, log = wrong(None)
    if not bad or not log or wrong(0)[0]:
        return None
    lo, hi = 0, len(log)  # wrong(lo) is False, wrong(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if wrong(mid)[0]:
            hi = mid
        else:
            lo = mid
    return log[hi - 1]


def _fuse_report(work, inputs, ratio, budget) -> tuple[nn.Module, Report]:
    report = Report()
    try:
        fused = _fuse(work, inputs, "", report, ratio, budget=budget)
    except engine.InternalError as e:
        report = Report(notes=[f"internal error, returned the model unfused — please report: {e}"])
        fused = work
    _fast_lookup(fused)
    return fused, report


# ---- fusing, module by module ----

def _fuse(module: nn.Module, inputs, path: str, report: Report, ratio: float, scopes=None,
          budget: engine.Budget | None = None, observation=None) -> nn.Module:
    """`module` (at `path`) fused. A module becomes one fused graph only where a merge combines
    ops of different children of it (a merge scope); elsewhere it keeps its class and Python
    code, and its children are fused: iterating it and calling its methods still work, and
    eager glue runs faster than a graph. `scopes`: the merge scopes an enclosing graph found
    (None: not known yet). `module` itself is left as it is."""
    prefix = f"{path}." if path else ""
    if trace.has_hooks(module):
        report.skipped.append(Skip("fuse", path or "<root>", "the module has forward hooks: kept as it is "
                                                             "(its children are fused)"))
        return _fuse_children(module, inputs, path, report, ratio, scopes, budget)
    if scopes is not None and path not in scopes:
        if not list(module.children()) or not any(s.startswith(prefix) for s in scopes):
            return module  # nothing merges in here
        return _fuse_children(module, inputs, path, report, ratio, scopes, budget)
    if _torch_layer(module):
        return module  # nothing inside to merge (and BatchNorm1d's input check refuses a tracer)
    gm, errors = trace.trace(module, fresh(inputs), front_ends=("fx",))
    if gm is None:
        # its children first, each fused where it traces (fast); with example inputs,
        # torch.export of the whole (slow) where that may merge more: a module without children,
        # or pieces that meet linearly (see _may_merge_across)
        below, kept = Report(), module
        if list(module.children()):
            if inputs is not None:
                observation = observation or usage.observe(module, fresh(inputs))
            kept = _fuse_children(module, inputs, path, below, ratio, None, budget, observation=observation)
        if inputs is not None and (kept is module or _may_merge_across(module, kept, observation)):
            gm, more = trace.trace(module, fresh(inputs), front_ends=("export",))
            errors += more
        if gm is None:
            report.untraced.append(Untraced(path or "<root>", "; ".join(errors), len(below.rewrites)))
            report.extend(below)
            return kept
    here = Report()
    if errors:
        here.untraced.append(Untraced(path or "<root>", "; ".join(errors)))
    outcome = _run_engine(gm, inputs, path, here, ratio, budget)
    found = {prefix + s if s else path for s in _merge_scopes(gm)}
    skipped = [Skip(r.rule, prefix + where(r.node), r.reason) for r in outcome.refused]
    if found and path not in found and list(module.children()):
        trial = Report()
        kept = _fuse_children(module, inputs, path, trial, ratio, found, budget)
        if _made(kept) == _made(gm):  # every merge again, below this module: keep its Python
            report.untraced += here.untraced
            report.extend(trial)
            # what the graph left alone outside the merge scopes (their fuses say the rest)
            report.skipped += [k for k, r in zip(skipped, outcome.refused)
                               if not _within(prefix + module_path(r.node), found)]
            _JUDGED.add(kept)
            return kept
    report.extend(here)
    report.rewrites += [replace(a, path=prefix + a.path) for a in outcome.applied]
    report.skipped += skipped
    report.unchecked += [f"{prefix}{u}" for u in outcome.unchecked]
    report.faults += [Skip(r.rule, prefix + where(r.node), r.reason) for r in outcome.faults]
    if not outcome.applied and not _has_hooked(gm) and not _folded(gm, path, report):
        _JUDGED.add(module)
        return module  # nothing merged: the module itself is exact, and keeps its class
    if getattr(gm, "reparam_static", None):
        shapes = ", ".join("(" + ", ".join(map(str, s)) + ")" for s in gm.reparam_static)
        guards = getattr(gm, "reparam_guards", [])
        held = f", where {' and '.join(guards)}" if guards else ""
        report.notes.append(f"the exported graph of '{path or '<root>'}' is shape-specialized: it accepts "
                            f"inputs of shape {shapes} only (* is any size){held}")
    _fuse_hooked(gm, prefix, report, ratio, budget)
    return _dressed(gm, module) if path else _with_attributes(gm, module)


_MODULE_STATE = set(vars(nn.Module()))  # nn.Module's own (hooks, tables, `training`)


def _with_attributes(gm: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """gm with what a caller may read of `module` (`m.f`, `self.attn.resolution`, a plain tensor
    such as `stride`, `_depth` behind a property): its attributes that are neither nn.Module's
    own state nor submodules, parameters or buffers, kept
    across `copy.deepcopy` (fx's preserved attributes)."""
    kept = {name: value for name, value in vars(module).items()
            if not (name in _MODULE_STATE or name in vars(gm) or isinstance(value, nn.Module))}
    for name, value in kept.items():
        setattr(gm, name, value)
    gm.meta.setdefault("_user_preserved_attributes", {}).update(kept)
    return gm


def _dressed(gm: fx.GraphModule, module: nn.Module) -> fx.GraphModule:
    """gm, fused in the place of `module` under a parent that stays Python: of a subclass of
    `module`'s class (so `isinstance`, its methods and attributes still serve the parent, as
    Ultralytics' `_predict_once` reads `m.f`, `m.i` of each layer), running gm's code. nn.Module's
    own methods (`_apply`, `train`, `__getattr__`, ...) stay the graph module's: a class that
    overrides them reads children the graph may have merged. torch's own classes and a class
    that cannot be combined with the graph module's are left a plain graph module."""
    return _dress(_with_attributes(gm, module), type(module))


def _dress(gm: fx.GraphModule, cls: type) -> fx.GraphModule:
    """gm of a subclass of both `cls` and its graph module class (see `_dressed`)."""
    if cls.__module__.split(".")[0] == "torch" or issubclass(cls, fx.GraphModule) \
            or any("__call__" in vars(c) for c in cls.__mro__ if c not in nn.Module.__mro__):
        return gm
    impl = type(gm)
    own = {k for c in cls.__mro__ if c not in nn.Module.__mro__ for k in vars(c)}
    body = {k: next(vars(c)[k] for c in impl.__mro__ if k in vars(c))
            for k in own & _MODULE_NAMES}
    # called as any module: fx's recompile on this class wraps whatever __call__ it finds here;
    # pickled as fx pickles a graph module, and dressed again when loaded
    body.update(__module__=cls.__module__, __qualname__=cls.__qualname__, __call__=nn.Module.__call__,
                __reduce__=_reduce_dressed, reparam_class=cls)
    try:
        gm.__class__ = type(cls.__name__, (cls, impl), body)
    except TypeError:  # a metaclass, __slots__ or __init_subclass__ of its own
        return gm
    return gm


def _reduce_dressed(self):
    load, args = fx.GraphModule.__reduce__(self)
    return _load_dressed, (load, args, type(self).reparam_class)


def _load_dressed(load, args, cls):
    return _dress(load(*args), cls)


# what a class of the user's must not override on a fused module: nn.Module's and fx's own
# methods and properties (a user's `extra_repr` or `_apply` may read a merged child)
_MODULE_NAMES = {k for c in fx.GraphModule.__mro__[:-1] for k in vars(c)} - {
    "__init__", "__new__", "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
    "__annotations__", "__firstlineno__", "__static_attributes__"}


# modules kept as Python although a graph of theirs was fused (every merge was below them, or
# none applied): a piece, whose inside that graph has judged
_JUDGED: weakref.WeakSet = weakref.WeakSet()
_BN = nn.modules.batchnorm._BatchNorm
_LINEAR = (nn.modules.conv._ConvNd, _BN, nn.Linear)
_LINEAR_FUNCTIONS = ADD | SUB | MUL | NEG | CAT


def _may_merge_across(module: nn.Module, kept: nn.Module, seen: usage.Observation) -> bool:
    """Could one graph of `module` merge more than `kept` (its children fused one by one, its
    own Python kept)? Where a norm is left next to no op of its graph (`_open_norms`), or two of
    the fused pieces meet linearly on the example inputs: one reads what another returns, the
    first ending and the second starting with a linear op (conv → BN across children), or two
    linear pieces read the same tensor and give the same shape (the branches of a sum).
    Elsewhere torch.export (seconds per module) would find nothing more to merge."""
    if _open_norms(kept):
        return True
    pieces = [(seen.flows[id(m)], f, up) for m, f, up in _pieces(module, kept) if id(m) in seen.flows]
    made_by = {t: i for i, ((_, outs, _), _, _) in enumerate(pieces) for t in outs}
    readers = {}
    for i, ((ins, _, shapes), f, up) in enumerate(pieces):
        for t in ins:
            j = made_by.get(t)
            if j is not None and j != i and _ends_linear(pieces[j][1]) and _starts_linear(f):
                return True
            if _all_linear(f):  # a branch: linear siblings of one shape reading one tensor
                readers.setdefault((t, tuple(shapes), id(up)), []).append(f)
    return any(len(fs) >= 2 for fs in readers.values())


def _pieces(module: nn.Module, kept: nn.Module):
    """(original, fused, original parent) for each piece of `kept` that runs as one: a graph or
    a leaf module, found below the modules whose Python was kept."""
    for name, child in module.named_children():
        fused = kept._modules.get(name)
        if fused is None:
            continue
        if isinstance(fused, fx.GraphModule) or not list(fused.children()) or fused in _JUDGED:
            yield child, fused, module
        else:
            yield from _pieces(child, fused)


def _linear_nodes(gm: fx.GraphModule, nodes) -> bool:
    return any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), _LINEAR) for n in nodes)


def _ends_linear(m: nn.Module) -> bool:
    if not isinstance(m, fx.GraphModule):
        return isinstance(m, _LINEAR)
    out = next(n for n in m.graph.nodes if n.op == "output")
    return _linear_nodes(m, out.all_input_nodes)


def _starts_linear(m: nn.Module) -> bool:
    if not isinstance(m, fx.GraphModule):
        return isinstance(m, _LINEAR)
    return any(_linear_nodes(m, n.users) for n in m.graph.nodes if n.op == "placeholder")


def _all_linear(m: nn.Module) -> bool:
    if not isinstance(m, fx.GraphModule):
        return isinstance(m, _LINEAR)
    return all(n.op in ("placeholder", "output", "get_attr")
               or n.op == "call_module" and isinstance(m.get_submodule(n.target), _LINEAR)
               or n.op == "call_function" and n.target in _LINEAR_FUNCTIONS for n in m.graph.nodes)


def _open_norms(model: nn.Module) -> list[nn.Module]:
    """The batch norms in `model` that no graph holds with the op before them: called by a
    parent's Python, or reading their graph's input. A graph spanning more may fold them."""
    held = {id(m) for gm in model.modules() if isinstance(gm, fx.GraphModule) or gm in _JUDGED
            for m in gm.modules()}
    open_ = [m for m in model.modules() if isinstance(m, _BN) and id(m) not in held]
    for gm in model.modules():
        if isinstance(gm, fx.GraphModule):
            for n in gm.graph.nodes:
                if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node) \
                        and n.args[0].op == "placeholder" \
                        and isinstance(gm.get_submodule(n.target), _BN):
                    open_.append(gm.get_submodule(n.target))
    return open_


def _folded(gm: fx.GraphModule, path: str, report: Report) -> bool:
    """The trace computed convs on parameters alone once (a kernel built in forward), which the
    module computes at every call: the graph is the better module even with no rewrite."""
    n = getattr(gm, "reparam_folded", 0)
    if n:
        report.notes.append(f"'{path or '<root>'}' computes {n} conv(s) from parameters alone in forward: "
                            "computed once, at trace time")
    return bool(n)


def _torch_layer(module: nn.Module) -> bool:
    """One of torch's own layers with no children (BatchNorm1d, Conv2d, ReLU...): fx's tracer
    treats it as a leaf wherever it appears; so does `fuse`, at the root too."""
    return type(module).__module__.startswith(("torch.nn.", "torch.ao.nn.")) and not module._modules


def _within(path: str, scopes) -> bool:
    return any(path == s or path.startswith(s + ".") or not s for s in scopes)


def _made(model: nn.Module) -> int:
    """How many ops fusing made, in all the graphs of `model`."""
    return sum(n.meta.get("reparam_new", False) for m in model.modules() if isinstance(m, fx.GraphModule)
               for n in m.graph.nodes)


def _fuse_children(module, inputs, path, report, ratio, scopes, budget, plan=None,
                   observation=None) -> nn.Module:
    """A shallow copy of `module` (same class, code, hooks and attributes) with its children
    fused; a child the module uses as a collection (see `usage`) keeps its class too.
    plan: how the parent uses this module ((levels, tail) of `usage.from_source`; None: not as a
    collection); observation: with example inputs, `usage.observe` of this module or an
    ancestor (the arguments each module was called with, the modules used as collections)."""
    if inputs is not None and observation is None:
        observation = usage.observe(module, fresh(inputs))
    seen, observed = (observation.args, observation.loose) if observation else ({}, None)
    names = [name for name, _ in module.named_children()]
    if observed is not None:
        uses = {name: (1, "observed") if id(getattr(module, name)) in observed else usage.WHOLE for name in names}
    elif plan is not None and plan[0] > 1:  # its children are collections too
        uses = dict.fromkeys(names, (plan[0] - 1, plan[1]))
    elif plan is not None and plan[1] == "call":  # its children are called whole
        uses = dict.fromkeys(names, usage.WHOLE)
    else:  # its own code (or the parent's reach into it) decides
        uses = usage.from_source(module)
    out = copy.copy(module)
    out._modules = type(module._modules)(module._modules)
    for name, child in module.named_children():
        sub = f"{path}.{name}" if path else name
        if uses[name] != usage.WHOLE:  # a collection: keeps its class, its children are fused
            below = None if uses[name][1] == "observed" else uses[name]
            fused = _fuse_children(child, None, sub, report, ratio, scopes, budget, below, observation) \
                if list(child.children()) else child
        else:
            fused = _fuse(child, seen.get(id(child)), sub, report, ratio, scopes, budget, observation)
        out._modules[name] = fused
        if name in out.__dict__:  # a plain-attribute alias of the child (see _fast_lookup)
            object.__setattr__(out, name, fused)
    return out


def _has_hooked(gm: fx.GraphModule) -> bool:
    return any(trace.has_hooks(m) and list(m.children()) for m in gm.modules() if m is not gm)


def _fuse_hooked(gm: fx.GraphModule, prefix: str, report: Report, ratio: float, budget):
    """Modules with hooks are calls of their own in a graph: fuse their children, keep them."""
    for n in gm.graph.nodes:
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if m is not None and trace.has_hooks(m) and list(m.children()):
            fused = _fuse(m, None, prefix + n.target, report, ratio, None, budget)
            gm.add_submodule(n.target, fused)


def _run_engine(gm: fx.GraphModule, inputs, path: str, report: Report, ratio: float, budget) -> engine.Outcome:
    if inputs is not None and not any("val" in n.meta for n in gm.graph.nodes):
        try:
            ShapeProp(gm).propagate(*fresh(inputs))
        except Exception as e:  # shapes only sharpen a few checks; rules refuse without them
            report.notes.append(f"shape propagation failed at '{path or '<root>'}': {e}")
    return engine.run(gm, max_macs_ratio=ratio, budget=budget, prefix=f"{path}." if path else "")


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


# ---- the post-condition ----

def _postcondition(original: nn.Module, fused: nn.Module, inputs):
    """What every result of `fuse` must satisfy; a violation is reparam's bug, never returned."""
    def tensors(m):
        return [(n, t) for n, t in [*m.named_parameters(), *m.named_buffers()]]

    before = tensors(original)
    on_meta = any(t.is_meta for _, t in before)
    kinds = {(t.dtype, t.device.type) for _, t in before if t.is_floating_point()}
    if not kinds:
        floats = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        kinds = {(torch.get_default_dtype(), "cpu")} | {(t.dtype, t.device.type) for t in floats}
    for name, t in tensors(fused):
        if t.is_meta and not on_meta:
            raise InternalError(f"reparam: internal error: the fused model's '{name}' is on the meta "
                                "device (never materialized) — please report")
        # a value the forward makes (`torch.tensor(0.5, dtype=torch.float64)`: fx's
        # `_tensor_constant<i>`, folded as `_reparam_const_<i>` in the dtype of what it replaced)
        # is the program's, whatever its dtype; the weights of the ops reparam makes are not
        constant = _CONSTANT.fullmatch(name.rsplit(".", 1)[-1])
        if t.is_floating_point() and (t.dtype, t.device.type) not in kinds and not constant:
            raise InternalError(f"reparam: internal error: the fused model's '{name}' is {t.dtype} on "
                                f"{t.device}, which the model never had — please report")
    for m in fused.modules():
        for name, value in vars(m).items():  # a forward's `self.mean = ...` run by a tracer
            if isinstance(value, fx.Proxy):
                raise InternalError(f"reparam: internal error: the fused model's attribute '{name}' is a "
                                    "tracer's Proxy — please report")
        if isinstance(m, fx.GraphModule):
            for n in m.graph.nodes:
                try:
                    if n.op == "call_module":
                        m.get_submodule(n.target)
                    elif n.op == "get_attr":
                        _attr(m, n.target)
                except AttributeError:
                    raise InternalError(f"reparam: internal error: the fused graph calls '{n.target}', "
                                        "which it does not hold — please report") from None


_CONSTANT = re.compile(rf"_tensor_constant\d+|{CONST_PREFIX}\d+")


def _attr(m: nn.Module, target: str):
    for part in target.split("."):
        m = getattr(m, part)
    return m
