"""The fixpoint: apply the rules at every node until a pass changes nothing."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from . import report
from .ops import Graph, Refusal, Rewrite
from .rules import RULES


@dataclass
class Outcome:
    applied: list[report.Rewrite] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    passes: int = 0


def run(gm: fx.GraphModule, rules=RULES, max_passes: int = 100, max_macs_ratio: float = 1.0) -> Outcome:
    """Rewrite `gm` in place. Refusals are those of the final pass: the places left alone."""
    g = Graph(gm, max_macs_ratio)
    out = Outcome()
    for out.passes in range(1, max_passes + 1):
        changed, refused = False, {}
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph:  # erased earlier in this pass
                continue
            for rule in rules:
                result = rule(node, g)
                if isinstance(result, Rewrite):
                    new = g.apply(result)
                    out.applied.append(report.Rewrite(result.rule, _where(g, new), result.detail, _shape(g, new)))
                    changed = True
                    break
                if isinstance(result, Refusal):
                    refused.setdefault((result.rule, result.node, result.reason), result)
        if not changed:
            out.refused = list(refused.values())
            break
    else:
        raise RuntimeError(f"reparam: no fixpoint after {max_passes} passes; a rule keeps firing")
    g.cleanup()
    return out


def _where(g: Graph, node: fx.Node) -> str:
    return node.target if node.op == "call_module" else g.path(node) or node.name


def _shape(g: Graph, node: fx.Node) -> str:
    m = g.module(node)
    if m is None or not node.meta.get("reparam_new"):
        return ""
    w = m.weight
    groups = getattr(m, "groups", 1)
    return f"{type(m).__name__}{tuple(w.shape)}" + (f" groups={groups}" if groups > 1 else "")
