"""The fixpoint: apply the rules at every node until a pass changes nothing.

Nothing a rule returns is trusted: a rule that raises is a refusal ('internal error in <rule>'),
a rewrite the graph cannot host is a refusal (`Graph.admissible`), and every rewrite is checked
on probes (`check.verify`) before it is applied."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import fx

from . import check, report, rules as rules_module
from .ops import Graph, NewConv, Refusal, Rewrite, where


@dataclass
class Budget:
    """What a fuse may apply: not the rewrites in `blocked` (keys), at most `limit` in all
    (None: any number). `fuse` uses it to find the rewrites behind a wrong result."""
    limit: int | None = None
    blocked: set = field(default_factory=set)
    log: list = field(default_factory=list)  # the rewrites applied, in order (paths in the model)
    # fingerprints of rewrites the self-check passed: the same rewrite of the same ops (a module
    # fused again on its own, after a graph of its parent) is not evaluated twice
    verified: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # verdicts by `_dropped_module` key

    def allows(self, key) -> bool:
        return key not in self.blocked and (self.limit is None or len(self.log) < self.limit)


@dataclass
class Outcome:
    applied: list[report.Rewrite] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    faults: list[Refusal] = field(default_factory=list)  # a rule raised, or its rewrite was not exact
    unchecked: list[str] = field(default_factory=list)  # rewrites the self-check could not evaluate
    passes: int = 0


class InternalError(RuntimeError):
    """Applying a rewrite failed half-way: the graph cannot be trusted any more."""


def key(rw: Rewrite, prefix: str = "") -> tuple:
    """The same rewrite of the same traced graph (of the module at `prefix`) has the same key in
    every fuse."""
    return (rw.rule, prefix, tuple(sorted({n.name for n in [rw.output, *rw.erase]})))


def _propose(rule, node: fx.Node, g: Graph):
    try:
        return rule(node, g)
    except Exception as e:  # a rule's bug: this place stays as it is
        return Refusal(rule.__name__, node, f"internal error in {rule.__name__}: {type(e).__name__}: {e}"
                       .splitlines()[0])


def fingerprint(rw: Rewrite, prefix: str) -> tuple[tuple, list]:
    """What a rewrite does, in terms that do not depend on which graph holds it: the rule, the
    model's modules (and ops) it replaces, the new ops' specs; and the new ops' tensors."""
    news = [n.spec for n in rw.substitute + [t for t, _ in rw.terms if isinstance(t, NewConv)]]
    places = sorted({prefix + where(n) for n in [rw.output, *rw.erase]})
    shapes = tuple((tuple(s.weight.shape), s.bias is None, s.stride, s.padding, s.dilation, s.groups) for s in news)
    return (rw.rule, tuple(places), shapes, rw.cat_dim, len(rw.terms)), \
        [t for s in news for t in (s.weight, s.bias) if t is not None]


def _verified(budget: Budget, fp) -> bool:
    cheap, tensors = fp
    return any(all(torch.equal(a, b) for a, b in zip(tensors, seen)) for seen in budget.verified.get(cheap, ()))


_SETTINGS = (int, float, bool, str, tuple, type(None))


def _dropped_module(rw: Rewrite, g: Graph) -> tuple | None:
    """For a rewrite that replaces a torch layer without tensors (nn.Identity, eval Dropout) by
    its input: a key of what its verdict depends on (the class, its settings, the input's
    shape), so that 160 such layers are evaluated once; else None."""
    n, m = rw.output, g.module(rw.output)
    if m is None or len(n.args) != 1 or n.kwargs or rw.terms != [(n.args[0], 1.0)] or rw.erase != [n] \
            or rw.substitute or not type(m).__module__.startswith("torch.nn.") \
            or m._parameters or m._buffers or m._modules or m._forward_hooks or m._forward_pre_hooks:
        return None
    settings = [(k, v) for k, v in vars(m).items() if not k.startswith("_")]
    if not all(isinstance(v, _SETTINGS) for _, v in settings):
        return None
    return (rw.rule, type(m), tuple(sorted(settings)), g.shape(n.args[0]), rw.tolerance)


def _vet(rw: Rewrite, g: Graph, budget: Budget, out: Outcome, prefix: str) -> Refusal | None:
    """Why `rw` must not be applied, or None."""
    if key(rw, prefix) in budget.blocked:
        return Refusal(rw.rule, rw.output, "undone: with it the fused model differed from the model "
                                           "on the example inputs — please report")
    if reason := g.admissible(rw):
        return Refusal(rw.rule, rw.output, reason)
    seen = None if g.on_meta else fingerprint(rw, prefix)
    if seen is not None and _verified(budget, seen):
        return None
    drop = _dropped_module(rw, g)
    verdict = budget.dropped.get(drop) or check.verify(g, rw, rw.tolerance or check.TOLERANCE)
    if drop is not None and verdict.error is not None:
        budget.dropped[drop] = verdict
    if verdict.error is None:
        out.unchecked.append(f"{rw.rule} at {where(rw.output)}: {verdict.message}")
    elif verdict.error > (rw.tolerance or check.TOLERANCE):
        why = f" ({verdict.message})" if verdict.message else ""
        return Refusal(rw.rule, rw.output, f"not exact here (rel err {verdict.error:.1e}){why}; left alone "
                                           "— please report")
    else:
        budget.verified.setdefault(seen[0], []).append(seen[1])
    return None


def run(gm: fx.GraphModule, rules=None, max_passes: int = 100, max_macs_ratio: float = 1.0,
        budget: Budget | None = None, prefix: str = "") -> Outcome:
    """Rewrite `gm` in place. Refusals are those of the final pass: the places left alone."""
    rules = rules_module.RULES if rules is None else rules
    budget = budget or Budget()
    g = Graph(gm, max_macs_ratio, prefix)
    out = Outcome()
    with torch.no_grad():
        for out.passes in range(1, max_passes + 1):
            changed, refused = False, {}
            for node in list(gm.graph.nodes):
                if node.graph is not gm.graph:  # erased earlier in this pass
                    continue
                for rule in rules:
                    result = _propose(rule, node, g)
                    if isinstance(result, Rewrite):
                        k = key(result, prefix)
                        if not budget.allows(k) and k not in budget.blocked:
                            continue  # over the limit: left for a later fuse
                        result = _vet(result, g, budget, out, prefix) or result
                    if isinstance(result, Rewrite):
                        try:
                            new = g.apply(result)
                        except Exception as e:
                            raise InternalError(f"applying {result.rule} at {where(result.output)} failed: "
                                                f"{type(e).__name__}: {e}") from e
                        out.applied.append(report.Rewrite(result.rule, _where(g, new), result.detail,
                                                          _shape(g, new), k))
                        budget.log.append(replace(out.applied[-1], path=prefix + out.applied[-1].path))
                        changed = True
                        break
                    if isinstance(result, Refusal):
                        refused.setdefault((result.rule, result.node, result.reason), result)
                        if result.reason.startswith(("internal error in", "not exact here")) and \
                                result not in out.faults:
                            out.faults.append(result)
            if not changed:
                out.refused = list(refused.values())
                break
        else:
            raise InternalError(f"no fixpoint after {max_passes} passes; a rule keeps firing")
        if out.applied:
            g.relax_views()
        g.cleanup()
    return out


def _where(g: Graph, node: fx.Node) -> str:
    return node.target if node.op == "call_module" else g.path(node) or node.name


def _shape(g: Graph, node: fx.Node) -> str:
    pending = g._pending.get(node.target) if node.op == "call_module" else None
    if pending is None:
        return ""
    spec = pending.spec
    kind = {0: "Linear", 1: "Conv1d", 2: "Conv2d", 3: "Conv3d"}[spec.nd] if pending.conv else "ChannelAffine"
    groups = f" groups={spec.groups}" if spec.groups > 1 and pending.conv else ""
    return f"{kind}{tuple(spec.weight.shape)}{groups}"
