"""Translation validation: every rewrite is checked before it is applied.

Rules can be wrong; the engine does not trust them. `verify` evaluates the ops a rewrite
replaces and the ops it would make, both in float64 with the model's weights, on random probe
tensors of odd spatial sizes fed to the same boundary nodes (the tensors the region reads), and
measures the relative error. The graph is not touched: the new ops are evaluated from their
specs. Probe shapes come from the new convs' specs (channels and rank), else from the shapes
recorded with example inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from . import trace
from .algebra import ConvSpec, dense
from .mutation import is_size, op_name
from .ops import Constant, Graph, NewConv, Rewrite, plain

TOLERANCE = 1e-9  # float64 evaluation of the same weights: only rounding differs
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Verdict:
    error: float | None   # the measured relative error; None: the region could not be evaluated
    message: str = ""     # why not, or what differed


class _Unknown(Exception):
    """A probe's shape cannot be told: the check cannot run (never a verdict on the rule)."""


def run_spec(spec: ConvSpec, x: torch.Tensor) -> torch.Tensor:
    """What the op made from `spec` computes, in float64."""
    if spec.nd == 0:
        return F.linear(x, dense(spec), spec.bias)
    return _CONV[spec.nd](x, spec.weight, spec.bias, spec.stride, spec.padding, spec.dilation, spec.groups)


def verify(g: Graph, rw: Rewrite, tolerance: float = TOLERANCE) -> Verdict:
    """How far the rewrite's result is from what it replaces, on probes (see the module doc)."""
    if g.on_meta:
        return Verdict(None, "the model is on the meta device")
    news = rw.substitute + [t for t, _ in rw.terms if isinstance(t, NewConv)]
    region = set(rw.erase) | {rw.output} | {r for n in news for r in n.replaces}
    region |= _downstream(rw.output, {n.replaces[0] for n in rw.substitute})
    last = None
    # a Linear's input may have any rank (its features last): the ranks a probe tries
    ranks = (2, 4, 3) if any(n.spec.nd == 0 for n in news) else (2,)
    for shapes, rank in [("specs", r) for r in ranks] + [("recorded", 2)]:
        try:
            probe = _Probes(g, rw, news, region, shapes, rank)
            try:
                probe.made()  # the output's shape, for the probes of kept terms
            except Exception:  # judged below, after the old ops ran
                pass
            old = probe.old(rw.output)
        except _Unknown as e:
            last = Verdict(None, str(e))
            continue
        except Exception as e:  # the replaced ops do not take these probes
            last = Verdict(None, f"the replaced ops fail on probes: {type(e).__name__}: {trace._first_line(e)}")
            continue
        try:
            new = probe.new()
            return Verdict(_rel_error(old, new))
        except _Unknown as e:
            last = Verdict(None, str(e))
        except Exception as e:
            return Verdict(math.inf, f"the new ops fail where the old ones run: {type(e).__name__}: {trace._first_line(e)}")
    return last


def _downstream(output: fx.Node, starts: set) -> set:
    """Nodes on a path from any of `starts` to `output` (what a substitution changes)."""
    out, seen = set(), {}
    if not starts:
        return out

    def reaches(n: fx.Node) -> bool:
        if n in seen:
            return seen[n]
        seen[n] = False
        hit = any([reaches(a) for a in n.all_input_nodes]) or n in starts
        seen[n] = hit
        if hit:
            out.add(n)
        return hit

    reaches(output)
    return out


class _Probes:
    """Float64 evaluation of the old region and of the rewrite, on shared probes."""

    def __init__(self, g: Graph, rw: Rewrite, news: list[NewConv], region: set, shapes: str, rank: int = 2):
        self.g, self.rw, self.news, self.region, self.shapes, self.rank = g, rw, news, region, shapes, rank
        self.gen = torch.Generator().manual_seed(0)
        self.values: dict[fx.Node, object] = {}
        self.hints = {n.input: n.spec for n in news}
        self.size = _sizes(news)
        # one sample, but two where the region moves axes (a rule may mistake the batch axis)
        self.batch = 2 if any(_moves_axes(n) for n in region) else 1
        self.out_shape = None
        # kept terms are computed from their own inputs where they can be: a rule may rely on
        # what they are (relu(relu(x)) is relu(x) because relu(x) is never negative)
        self.expand = {t for t, _ in rw.terms if isinstance(t, fx.Node) and t not in self.hints
                       and t.op in ("call_module", "call_function", "call_method")}
        self.new_values: dict[fx.Node, object] = {}
        self._made: list | None = None

    # ---- the boundary: probes ----
    def outside(self, n: fx.Node):
        if n in self.values:
            return self.values[n]
        if n.op == "get_attr":
            v = interpret(self.g, n, None)
        elif n.op != "placeholder" and (is_size(n) or constant(n)):
            v = self.interpret(n, self.outside)
        else:
            shape, v = self.shape_of(n), None
            if n in self.expand:
                try:
                    v = self.interpret(n, self.outside)
                except Exception:  # its inputs' shapes are not known: a probe in its place
                    v = None
                if not (isinstance(v, torch.Tensor) and self._fits(v.shape, shape)):
                    v = None  # its inputs were sized for its output: wrong where it resizes
            if v is None:
                v = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        self.values[n] = v
        return v

    def shape_of(self, n: fx.Node) -> tuple:
        recorded = self.g.shape(n)
        if self.shapes == "recorded":
            if recorded is None:
                raise _Unknown(f"no shape for '{n.name}'")
            return self.g.size_hint(n)
        spec = self.hints.get(n)
        if spec is not None and spec.nd == 0:  # a Linear: features last, at the rank recorded or tried
            rank = len(recorded) if recorded is not None else self.rank
            return (self.batch, *self.size[:rank - 2], spec.in_channels)
        if spec is not None:
            return (self.batch, spec.in_channels, *self.size[:spec.nd])
        if recorded is not None and len(recorded) >= 2 and isinstance(recorded[1], int):
            return (self.batch, recorded[1], *self.size[:len(recorded) - 2])
        if self.out_shape is not None:
            return self.out_shape
        return (self.batch, 4, *self.size[:2])  # shape-agnostic ops (identity, reshape round trips)

    def _fits(self, got, want) -> bool:
        """A value of shape `got` can stand where `want` was planned (channels may differ
        along a concatenation's dim)."""
        if len(got) != len(want):
            return False
        skip = self.rw.cat_dim % len(want) if self.rw.cat_dim is not None else None
        return all(a == b for i, (a, b) in enumerate(zip(got, want)) if i != skip)

    # ---- evaluation ----
    def old(self, n: fx.Node):
        if n in self.region:
            if n not in self.values:
                self.values[n] = self.interpret(n, self.old)
            return self.values[n]
        return self.outside(n)

    def made(self) -> list:
        """The new convs among the terms, on their probes (they tell the output's shape)."""
        if self._made is None:
            subs = {s.replaces[0]: s for s in self.rw.substitute}
            self._made = [(run_spec(term.spec, self._new(term.input, subs)), coef)
                          for term, coef in self.rw.terms if isinstance(term, NewConv)]
            if self._made:
                self.out_shape = tuple(self._made[0][0].shape)
        return self._made

    def new(self):
        subs = {s.replaces[0]: s for s in self.rw.substitute}
        vals, it = [], iter(self.made())
        for term, coef in self.rw.terms:
            if isinstance(term, NewConv):
                vals.append(next(it))
            elif isinstance(term, Constant):
                vals.append((term.value.double(), coef))
            else:
                vals.append((self._new(term, subs), coef))
        if self.rw.cat_dim is not None:
            return torch.cat([v for v, _ in vals], dim=self.rw.cat_dim)
        return sum(v * c for v, c in vals)

    def _new(self, n: fx.Node, subs: dict):
        if n in self.new_values:
            return self.new_values[n]
        if n in subs:
            v = run_spec(subs[n].spec, self._new(subs[n].input, subs))
        elif n in self.region and n is not self.rw.output:
            v = self.interpret(n, lambda a: self._new(a, subs))
        elif n in self.region:
            raise _Unknown("the rewrite reads the op it replaces")
        else:
            v = self.outside(n)
        self.new_values[n] = v
        return v

    def interpret(self, n: fx.Node, value):
        return interpret(self.g, n, value)


def interpret(g: Graph, n: fx.Node, value):
    """What node `n` computes in float64, its inputs' values given by `value(node)`."""
    if n.op == "get_attr":
        v = g.const(n)
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    args = fx.node.map_arg(n.args, value)
    kwargs = fx.node.map_arg(n.kwargs, value)
    if n.op == "call_module":
        pending = g._pending.get(n.target)
        if pending is not None:
            return run_spec(pending.spec, args[0] if args else next(iter(kwargs.values())))
        m, state = g.module(n), g.float64_state(n.target)
        if not kwargs and len(args) == 1 and plain(m):
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
                return m._conv_forward(args[0], state["weight"], state.get("bias"))
            if isinstance(m, nn.Linear):
                return F.linear(args[0], state["weight"], state.get("bias"))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats:
                m._check_input_dim(args[0])
                return F.batch_norm(args[0], state["running_mean"], state["running_var"], state.get("weight"),
                                    state.get("bias"), False, 0.0, m.eps)
        return functional_call(m, state, args, kwargs)  # what the module's forward does
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    raise _Unknown(f"cannot evaluate '{n.name}' ({n.op})")


def constant(n: fx.Node, memo=None) -> bool:
    """`n` is computed from the graph's constants and sizes only (no input's values)."""
    memo = {} if memo is None else memo
    if n not in memo:
        memo[n] = False
        memo[n] = n.op == "get_attr" or is_size(n) or (
            n.op in ("call_function", "call_method") and bool(n.all_input_nodes)
            and all(constant(a, memo) for a in n.all_input_nodes))
    return memo[n]


def evaluate(g: Graph, node: fx.Node, known: dict):
    """`node`'s value in float64 given the values of the nodes in `known` (and the graph's
    constants); raises where it depends on anything else."""
    memo = dict(known)

    def value(n: fx.Node):
        if n not in memo:
            if n.op == "placeholder":
                raise _Unknown(f"'{node.name}' depends on the input '{n.name}'")
            memo[n] = interpret(g, n, value)
        return memo[n]

    with torch.no_grad():
        return value(node)


_AXES = ("flatten", "unflatten", "reshape", "view", "permute", "movedim", "transpose", "squeeze", "unsqueeze",
         "getitem", "cat", "stack", "split", "chunk", "expand", "select", "narrow", "slice", "mean")


def _moves_axes(n: fx.Node) -> bool:
    """`n` reshapes, reorders, indexes or reduces axes (which ones matters to it)."""
    return n.op in ("call_function", "call_method") and any(a in op_name(n) for a in _AXES)


def _sizes(news: list[NewConv]) -> tuple[int, ...]:
    """Odd probe sizes, different per axis, large enough for every kernel involved."""
    extent = max([d * (k - 1) + 1 for n in news for k, d in zip(n.spec.kernel, n.spec.dilation)] or [1])
    base = extent + 2 + (extent + 3) % 2  # odd: extent + 2 or + 3 (a border and an interior)
    return (base, base + 2, base + 4)


def _rel_error(old, new) -> float:
    a = [t for t in tree_leaves(old) if isinstance(t, torch.Tensor)]
    b = [t for t in tree_leaves(new) if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        if not x.numel():
            continue
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
                return math.inf
            keep = torch.isfinite(x)
            x, y = x[keep], y[keep]
            if not x.numel():
                continue
        scale = x.abs().max().item()
        err = (x - y).abs().max().item()
        worst = max(worst, err / scale if scale > 0 else err)
    return worst

