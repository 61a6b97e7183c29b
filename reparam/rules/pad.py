"""A pad whose border is then overwritten with one value per channel: a padded op, where that
value is what the op before it gives for a zero input.

The usual way to write DBB's BN-and-pad (and the bias-padded 1×1 → 3×3 of super-resolution
nets) is `F.pad(y, [p] * 4)` then four slice assignments `y[:, :, 0:p, :] = v`, ... . After the
front end made the writes data flow, the pad and the writes are a chain of nodes; what the chain
computes is read by running it on probes (so any spelling of the writes is recognized: slices,
negative indices, export's slice_scatter), not by matching one spelling. If the op t before the
pad is per-position (a BN, a scale, a 1×1 stride-1 conv) and v is its value at zero, the chain
is t zero-padded: the padded op `t` becomes, whose border is its bias (a conv's zero padding
then bias add). v matches t's bias to the model's precision (v was rounded by the model's own
arithmetic); the self-check allows that much.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from .. import algebra, functional
from ..check import constant, evaluate
from ..ops import Graph, NewConv, Refusal, Rewrite, arg, source, where
from .common import as_conv, linear

NAME = "pad_border"
aten = torch.ops.aten
_WRITES = {functional.setitem, functional.scatter, aten.slice_scatter.default, aten.select_scatter.default,
           aten.index_put.default}
_PADS = {F.pad, aten.pad.default, aten.constant_pad_nd.default}


def _is_write(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _WRITES


def _zero_pad(n: fx.Node) -> tuple[int, ...] | None:
    """Per spatial axis, the symmetric zero padding of a constant pad (None if it is not one)."""
    if n.op != "call_function" or n.target not in _PADS:
        return None
    pad = arg(n, 1, "pad")
    mode = arg(n, 2, "mode", "constant") if n.target is not aten.constant_pad_nd.default else "constant"
    value = arg(n, 3 if n.target is not aten.constant_pad_nd.default else 2, "value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (list, tuple)) \
            or len(pad) % 2 or not all(isinstance(p, int) and p >= 0 for p in pad):
        return None
    pairs = [pad[i:i + 2] for i in range(0, len(pad), 2)][::-1]  # F.pad lists the last axis first
    if any(a != b for a, b in pairs) or not any(a for a, _ in pairs):
        return None
    return tuple(a for a, _ in pairs)


def _chain(n: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the pad, the nodes from it to n) where n ends writes into a zero pad reading nothing else."""
    if not _is_write(n) or any(_is_write(u) and u.args[0] is n for u in n.users):
        return None
    p = n
    while _is_write(p):
        p = p.args[0]
        if not isinstance(p, fx.Node):
            return None
    if _zero_pad(p) is None:
        return None
    cone, stack = set(), [n]
    while stack:  # every tensor the writes read comes from the pad, or is a constant
        m = stack.pop()
        if m in cone or m is p:
            continue
        cone.add(m)
        for a in m.all_input_nodes:
            if a.op in ("placeholder",) or (a is not p and not _from(a, p) and not constant(a)):
                return None
            if a is not p and _from(a, p):
                stack.append(a)
    inner = [m for m in cone if m is not n]
    if any(u not in cone for m in inner + [p] for u in m.users):
        return None  # something else reads a partial result
    return p, [m for m in n.graph.nodes if m in cone]


def _from(a: fx.Node, p: fx.Node) -> bool:
    """a is computed from p (through nodes that read p)."""
    seen, stack = set(), [a]
    while stack:
        m = stack.pop()
        if m is p:
            return True
        if m in seen:
            continue
        seen.add(m)
        stack += m.all_input_nodes
    return False


def _border_values(g: Graph, pad: fx.Node, end: fx.Node, padding, channels: int, nd: int):
    """The per-channel values the chain writes into the whole border, if that is what it does
    for every probe (two sizes; the recorded size where the graph is shape-specialized)."""
    sizes = [(2, *(5 + 2 * i + j for i in range(nd))) for j in (0, 3)]
    known = {}
    if hasattr(g.gm, "reparam_static"):
        # torch.export's graph: sizes come from the graph's inputs, so probe at the recorded
        # shapes (the inputs as zeros: only their sizes are read)
        recorded = g.size_hint(source(pad))
        if recorded is None:
            return None
        sizes = [(recorded[0], *recorded[2:])]
        known = {n: torch.zeros(g.size_hint(n), dtype=torch.float64)
                 for n in g.gm.graph.nodes if n.op == "placeholder" and g.shape(n) is not None}
    values = None
    for k, (batch, *size) in enumerate(sizes):
        t = torch.randn((batch, channels, *size), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        try:
            out = evaluate(g, end, {**known, source(pad): t})
        except Exception:
            return None
        if not isinstance(out, torch.Tensor) or out.shape != (batch, channels, *(s + 2 * p for s, p in zip(size, padding))):
            return None
        inner = tuple(slice(p, p + s) for p, s in zip(padding, size))
        if not torch.equal(out[(slice(None), slice(None), *inner)], t):
            return None
        mask = torch.ones(out.shape[2:], dtype=torch.bool)
        mask[inner] = False
        border = out.movedim(1, 0)[:, :, mask]  # (C, N, positions)
        v = border[:, 0, 0]
        if not torch.equal(border, v[:, None, None].expand_as(border)):
            return None
        if values is not None and not torch.equal(v, values):
            return None
        values = v
    return values


def pad_border(node: fx.Node, g: Graph):
    got = _chain(node)
    if got is None:
        return None
    pad, cone = got
    padding = _zero_pad(pad)
    t = source(pad)
    lin = linear(g, t)
    if not isinstance(lin, tuple):
        return Refusal(NAME, node, f"the border written after the pad is not the value of {where(t)} at a "
                                   "zero input: no padded op computes it")
    spec, x = lin
    nd = len(padding)
    chans = algebra.channels(spec)[1] or g.channels(t, nd)
    if chans is None:
        return Refusal(NAME, node, "channel count unknown (pass example_inputs)")
    conv = as_conv(spec, chans, nd)
    if isinstance(conv, str):
        return Refusal(NAME, node, conv)
    if not (conv.pointwise() and all(s == 1 for s in conv.stride) and not any(conv.padding)):
        return Refusal(NAME, node, f"{where(t)} before the pad reads more than one position: its border "
                                   "is not one value per channel")
    if not g.single_use(t, pad) or g.shared(t):
        return Refusal(NAME, node, f"{where(t)} is also read elsewhere")
    values = _border_values(g, pad, node, padding, chans, nd)
    if values is None:
        return None  # the writes do something else than fill the border
    bias = conv.bias if conv.bias is not None else torch.zeros_like(values)
    dtype = g.dtype_device([t])
    eps = torch.finfo(dtype[0] if isinstance(dtype, tuple) else torch.float32).eps
    gap, size = (values - bias).abs().max().item(), values.abs().max().item()
    if gap > 64 * eps * (bias.abs().max().item() + size + 1.0):
        return Refusal(NAME, node, f"the border values differ from {where(t)}'s value at zero (by up to "
                                   f"{gap:.2g}): no padded op computes them")
    padded = algebra.ConvSpec(conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
    # the output holds the border values, so the model's own rounding of them is at most this
    # relative error (64 eps where they are zero and t's bias within 64 eps of it)
    tolerance = max(gap / size if size else 0.0, 64 * eps) * 1.01
    return Rewrite(NAME, node, [(NewConv(padded, x, [t, pad, *cone]), 1.0)], [node, *cone, pad, t],
                   f"{where(t)} padded by {padding}", tolerance=tolerance)
