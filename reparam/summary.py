"""A report a person reads: the rewrites grouped by block, and the fused convs' deployment health.

    blocks = group_by_block(model, fused, report.rewrites)
    print("\\n".join(b.line() for b in blocks))      # stage3.2 (GCBlock): 6 convs + 7 BNs → 1 conv 3×3, 64→64
    print(health_table(health(fused, report.rewrites)))

A block is a multi-branch region of the model's fx graph: a fork that dominates a join, with
the join post-dominating the fork among the nodes between them (networkx's
`immediate_dominators` on the graph, and on the reversed graph for post-dominators). Its name is
the module path all its modules share (`stage3.2`) and it counts as a block where it holds every
conv, BN and linear layer of that module. A rewrite belongs to the deepest block its module path
lies in; rewrites outside any block are grouped by their parent module. (The whole model is a
block only where none is found inside it: an input read again at the end, for its size, makes
one region of everything.)
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx, nn

from .report import Rewrite
from .trace import symbolic

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm
_SOURCE, _SINK = "<source>", "<sink>"


# --- regions -----------------------------------------------------------------------------

def _digraph(graph: fx.Graph) -> nx.DiGraph:
    """The data flow from the inputs (placeholders) as a DAG with one source and one sink;
    parameters (get_attr) and constants are not part of it."""
    g = nx.DiGraph()
    for node in graph.nodes:
        if node.op == "placeholder":
            g.add_edge(_SOURCE, node)
        if node in g:
            for user in node.users:
                g.add_edge(node, user)
    for node in list(g):
        if node != _SOURCE and not g.out_degree(node):
            g.add_edge(node, _SINK)
    return g


def _dominates(idom: dict, a, b) -> bool:
    """Whether `a` dominates `b` in the tree `idom` (node → immediate dominator)."""
    while b != a and idom.get(b, b) != b:
        b = idom[b]
    return b == a


def regions(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, set[fx.Node]]]:
    """(fork, join, the nodes after the fork up to the join) of each multi-branch region.

    From each fork (a node with several users): its immediate post-dominator, where the fork
    dominates it. From each join (a node with several inputs): its immediate dominator, so a
    block whose input also feeds another branch (GCNet's first semantic and detail blocks)
    is found as well; among the nodes between the two, the join post-dominates the fork."""
    g = _digraph(graph)
    idom = nx.immediate_dominators(g, _SOURCE)
    ipdom = nx.immediate_dominators(g.reverse(copy=False), _SINK)
    flow = [n for n in g if n not in (_SOURCE, _SINK)]
    pairs = {(f, ipdom[f]) for f in flow if g.out_degree(f) > 1 and _dominates(idom, f, ipdom[f])}
    pairs |= {(idom[j], j) for j in flow if g.in_degree(j) > 1}
    found = []
    for fork, join in pairs:
        if join == _SINK or fork == _SOURCE:
            continue
        between = (nx.descendants(g, fork) & nx.ancestors(g, join)) | {join}
        found.append((fork, join, between))
    return found


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _under(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + ".")


def block_scopes(model: nn.Module) -> set[str]:
    """Module paths of the model's multi-branch blocks (see the module docstring); empty when
    `reparam.fuse`'s symbolic front end cannot trace the model."""
    try:
        graph = symbolic(model).graph
    except Exception:  # noqa: BLE001 -- untraceable: the report groups by parent module instead
        return set()
    modules = dict(model.named_modules())
    counted = lambda n: n.op == "call_module" and isinstance(modules.get(n.target), (_CONV, _BN, nn.Linear))
    layers = [n for n in graph.nodes if counted(n)]
    scopes = set()
    for _, _, between in regions(graph):
        inside = [n.target for n in between if n.op == "call_module"]
        if not inside:
            continue
        scope = _common_path(inside)
        if all(n in between for n in layers if _under(n.target, scope)):  # the module's whole body
            scopes.add(scope)
    return scopes


# --- one line per block ------------------------------------------------------------------

@dataclass(frozen=True)
class Counts:
    """Layers under one module path."""
    convs: int
    bns: int
    linears: int

    def __str__(self) -> str:
        parts = [(self.convs, "conv"), (self.bns, "BN"), (self.linears, "linear")]
        text = " + ".join(f"{n} {word}{'s' if n != 1 else ''}" for n, word in parts if n)
        return text or "no conv, BN or linear"


def counts(model: nn.Module, scope: str) -> Counts:
    """Convs, BNs and linear layers among the modules at or under `scope` ('' is the model)."""
    mods = [m for name, m in model.named_modules() if _under(name, scope)]
    return Counts(sum(isinstance(m, _CONV) for m in mods), sum(isinstance(m, _BN) for m in mods),
                  sum(isinstance(m, nn.Linear) for m in mods))


def conv_summary(conv: nn.Module) -> str:
    """'conv 3×3, 64→64' (with stride, groups and dilation where they are not 1)."""
    k = "×".join(str(v) for v in conv.kernel_size)
    extra = [f"{name} {v[0] if len(set(v)) == 1 else v}" for name, v in
             (("stride", conv.stride), ("dilation", conv.dilation)) if any(s != 1 for s in v)]
    if conv.groups != 1:
        extra.append(f"groups {conv.groups}")
    return ", ".join([f"conv {k}", f"{conv.in_channels}→{conv.out_channels}"] + extra)


@dataclass(frozen=True)
class Block:
    """What the rewrites did inside one module."""
    path: str                      # module path ('' is the whole model)
    kind: str                      # the module's class name
    is_block: bool                 # a multi-branch block (else: the parent module of some rewrites)
    rewrites: tuple[Rewrite, ...]  # the rewrites inside it, in the order applied
    before: Counts                 # its layers in the original model
    after: Counts                  # its layers in the fused model
    after_conv: str = ""           # conv_summary of its one conv after fusing ('' when not one)

    def line(self) -> str:
        name = self.path or "(model)"
        if not self.is_block and (not self.path or self.before == self.after):
            rules = ", ".join(dict.fromkeys(r.rule for r in self.rewrites))
            return f"{name} ({self.kind}): {len(self.rewrites)} rewrite{'s' * (len(self.rewrites) != 1)} ({rules})"
        after = f"1 {self.after_conv}" if self.after_conv and self.after == Counts(1, 0, 0) else str(self.after)
        return f"{name} ({self.kind}): {self.before} → {after}"


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def group_by_block(model: nn.Module, fused: nn.Module, rewrites, scopes: set[str] | None = None) -> list[Block]:
    """One Block per multi-branch block holding rewrites, and per parent module of the others,
    in the order of their first rewrite. model: the original (training form); fused: the
    result of `reparam.fuse`; scopes: `block_scopes(model)` if already known."""
    scopes = block_scopes(model) if scopes is None else scopes
    if scopes - {""}:  # the model as a whole is a block only where none is found inside it
        scopes = scopes - {""}
    groups: dict[str, list[Rewrite]] = defaultdict(list)
    for r in rewrites:
        inside = [s for s in scopes if _under(r.path, s)]
        groups[max(inside, key=len) if inside else _parent(r.path)].append(r)
    original, deployed = dict(model.named_modules()), dict(fused.named_modules())
    blocks = []
    for path, rs in groups.items():
        after = counts(fused, path)
        convs = [m for name, m in deployed.items() if _under(name, path) and isinstance(m, _CONV)]
        kind = type(original[path]).__name__ if path in original else "-"
        blocks.append(Block(path, kind, path in scopes, tuple(rs), counts(model, path), after,
                            conv_summary(convs[0]) if len(convs) == 1 else ""))
    return blocks


_SHAPE = re.compile(r"^(Conv[123]d|ConvTranspose[123]d)\((\d+), (\d+)((?:, \d+)*)\)$")


def named_shape(shape: str) -> str:
    """'Conv2d(64, 3, 7, 7)' (a weight's shape) → 'Conv2d out 64, in 3, k 7×7'; others as they are."""
    m = _SHAPE.match(shape)
    if not m:
        return shape
    kind, a, b, kernel = m.groups()
    out, inp = (b, a) if kind.startswith("ConvTranspose") else (a, b)  # transposed weights: (in, out/groups, k)
    k = "×".join(re.findall(r"\d+", kernel))
    return f"{kind} out {out}, in {inp}" + (f", k {k}" if k else "")


# --- deployment health -------------------------------------------------------------------

@dataclass(frozen=True)
class Health:
    """How one fused layer's weight survives low precision; fractions are of its elements."""
    path: str
    max_abs: float            # max |w|
    fp16_overflow: float      # |w| above float16's largest finite value
    fp16_subnormal: float     # 0 < |w| < float16's smallest normal (precision lost, or 0)
    bf16_overflow: float
    bf16_subnormal: float
    int8_error: float         # ||w - dequant(quant(w))|| / ||w||, symmetric int8 per output channel


def _fractions(w: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    info, a = torch.finfo(dtype), w.abs()
    return float((a > info.max).double().mean()), float(((a > 0) & (a < info.tiny)).double().mean())


def int8_error(w: torch.Tensor) -> float:
    """Relative error of symmetric per-output-channel int8 quantization of `w` (out, ...)."""
    w = w.detach().double().reshape(w.shape[0], -1)
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float64).tiny)
    q = (w / scale).round().clamp(-127, 127) * scale
    return float((w - q).norm() / w.norm().clamp(min=torch.finfo(torch.float64).tiny))


def health(fused: nn.Module, rewrites=None) -> list[Health]:
    """A Health per conv and linear layer of `fused` that the rewrites produced (every one
    when `rewrites` is None or names none of them)."""
    layers = [(n, m) for n, m in fused.named_modules() if isinstance(m, (_CONV, nn.Linear))]
    made = {r.path for r in rewrites or ()}
    chosen = [(n, m) for n, m in layers if n in made] or layers
    result = []
    for name, m in chosen:
        w = m.weight.detach().float()
        result.append(Health(name, float(w.abs().max()), *_fractions(w, torch.float16),
                             *_fractions(w, torch.bfloat16), int8_error(w)))
    return result


def health_table(rows: list[Health]) -> str:
    """One line per layer, the worst int8 error last in a summary line."""
    head = f"{'layer':<40} {'max|w|':>9} {'fp16 over':>9} {'fp16 sub':>9} {'bf16 over':>9} {'bf16 sub':>9} {'int8 err':>9}"
    pct = lambda v: f"{100 * v:.2f}%"
    lines = [head] + [f"{h.path:<40} {h.max_abs:>9.3g} {pct(h.fp16_overflow):>9} {pct(h.fp16_subnormal):>9} "
                      f"{pct(h.bf16_overflow):>9} {pct(h.bf16_subnormal):>9} {h.int8_error:>9.3g}" for h in rows]
    if rows:
        worst = max(rows, key=lambda h: h.int8_error)
        lines.append(f"worst int8 per-channel error: {worst.int8_error:.3g} at {worst.path}; largest |w|: "
                     f"{max(h.max_abs for h in rows):.3g}")
    return "\n".join(lines)
