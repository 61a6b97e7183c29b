"""`expand`: the enlarging half of structural re-parameterization, for any plain network.

Every eligible conv → BN pair of a model (found in its fx graph: a Conv2d whose only reader is a
BatchNorm2d, neither with hooks, neither called twice, not already a branch of a linear
multi-branch block) becomes a training block, `Branches`: parallel branches summed, built by a
recipe with the conv's stride, padding, dilation and groups. `reparam.fuse` collapses each block
back into one conv of the original's kernel shape, so the deploy form keeps the original's op
count. The model keeps its class and Python code: the conv's module is replaced by the block and
the BN's by `nn.Identity` (the graph shows that the BN reads only that conv's output).

    train = reparam.expand(model, "dbb")   # wider training form, same eval function at step 0
    ...                                     # train it
    deploy = reparam.fuse(train)            # as many convs as reparam.fuse(model)
"""
from __future__ import annotations

import copy
import fnmatch
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from . import ops, trace
from .nn import BNAndPad
from .report import Skip, Untraced, stats_table
from .stats import Stats, count, run_counted
from .testing import rel_error

MARKER = "reparam_expanded"  # the recipe's name, on every block `expand` made


class Refused(Exception):
    """A recipe cannot build its block for this conv; the message says why (a user's recipe
    may raise it too: the conv is left alone and the report gives the message)."""


class Branches(nn.Module):
    """Σ branch(x), the first branch being the original conv → BN.

    (N, C_in, H, W) → (N, C_out, H', W'), the shapes of the conv it replaces."""

    def __init__(self, branches: dict[str, nn.Module], recipe: str):
        super().__init__()
        self.branches = nn.ModuleDict(branches)
        setattr(self, MARKER, recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        terms = [b(x) for b in self.branches.values()]
        y = terms[0]
        for t in terms[1:]:
            y = y + t
        return y


class Crop(nn.Module):
    """x[:, :, h:-h, w:-w]: what centres a smaller kernel on a conv padded less than k // 2.

    (N, C, H, W) → (N, C, H − 2h, W − 2w)."""

    def __init__(self, amount: tuple[int, int]):
        super().__init__()
        self.amount = tuple(amount)

    def extra_repr(self) -> str:
        return f"amount={self.amount}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = (slice(a, -a) if a else slice(None) for a in self.amount)
        return x[:, :, h, w]


# ---- building blocks of the recipes ----

def _new_conv(conv: nn.Conv2d, cin: int, cout: int, kernel, *, stride=(1, 1), dilation=(1, 1),
              groups: int | None = None, aligned: bool = True) -> nn.Module:
    """A bias-free conv on the conv's device and dtype. aligned: padded (or its input cropped) so
    that its output lines up with the conv's (same centre per axis: 2p − d(k − 1))."""
    pads, crops = [], []
    for k, d, p, kk, dd in zip(conv.kernel_size, conv.dilation, conv.padding, kernel, dilation):
        twice = 2 * p - d * (k - 1) + dd * (kk - 1)
        if not aligned:
            twice = 0
        if twice % 2:
            raise Refused(f"a {kk}-wide kernel cannot be centred on a {k}-wide one "
                          f"(padding {p}, dilation {d})")
        pads.append(max(twice // 2, 0))
        crops.append(max(-twice // 2, 0))
    new = nn.Conv2d(cin, cout, tuple(kernel), stride, tuple(pads), dilation,
                    conv.groups if groups is None else groups, bias=False,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    return nn.Sequential(Crop(crops), new) if any(crops) else new


def _new_bn(bn: nn.Module, channels: int, *, zero: bool = False, cls=None, **kwargs) -> nn.Module:
    """A BN of the pair's BN class (SyncBatchNorm stays SyncBatchNorm), eps and momentum, affine
    and with running statistics. zero: weight and bias 0, so the branch it ends adds 0 in eval."""
    cls = cls or (type(bn) if type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) else nn.BatchNorm2d)
    new = cls(channels, eps=bn.eps, momentum=bn.momentum, device=bn.running_mean.device,
              dtype=bn.running_mean.dtype, **kwargs)
    if zero:
        with torch.no_grad():
            new.weight.zero_()
            new.bias.zero_()
    return new


@torch.no_grad()
def _as_identity(conv1x1: nn.Conv2d, bn: nn.Module):
    """conv1x1 → bn is the identity in eval: an identity kernel (per group), BN with zero mean,
    unit variance, weight √(1 + eps) and zero bias."""
    w = conv1x1.weight
    w.zero_()
    per_group = w.shape[1]
    for o in range(w.shape[0]):
        w[o, o % per_group] = 1
    bn.running_mean.zero_()
    bn.running_var.fill_(1)
    bn.weight.fill_(math.sqrt(1 + bn.eps))
    bn.bias.zero_()


def _same_shape(conv: nn.Conv2d) -> bool:
    """An identity branch fits: in == out channels, stride 1, the output the input's size."""
    return (conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)
            and all(2 * p == d * (k - 1) for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding)))


def _one_by_one(conv, bn, zero):
    return nn.Sequential(_new_conv(conv, conv.in_channels, conv.out_channels, (1, 1), stride=conv.stride),
                         _new_bn(bn, conv.out_channels, zero=zero))


# ---- recipes: (conv, bn, preserve, **options) → the branches, the original conv → BN first ----

def repvgg(conv, bn, preserve: bool) -> dict[str, nn.Module]:
    """k×k conv-BN + 1×1 conv-BN + BN of x (where in == out channels and stride 1)."""
    branches = {"kxk": nn.Sequential(conv, bn), "conv1x1": _one_by_one(conv, bn, preserve)}
    if _same_shape(conv):
        branches["identity"] = _new_bn(bn, conv.out_channels, zero=preserve)
    return branches


def acnet(conv, bn, preserve: bool) -> dict[str, nn.Module]:
    """k×k conv-BN + 1×k conv-BN + k×1 conv-BN (the conv's dilation along the kernel's axis)."""
    kh, kw = conv.kernel_size
    if kh == 1 or kw == 1:
        raise Refused(f"a {kh}×{kw} kernel: acnet's 1×k and k×1 branches would repeat it")
    c, dh, dw = conv.out_channels, *conv.dilation
    return {"kxk": nn.Sequential(conv, bn),
            "hor": nn.Sequential(_new_conv(conv, conv.in_channels, c, (1, kw), stride=conv.stride, dilation=(1, dw)),
                                 _new_bn(bn, c, zero=preserve)),
            "ver": nn.Sequential(_new_conv(conv, conv.in_channels, c, (kh, 1), stride=conv.stride, dilation=(dh, 1)),
                                 _new_bn(bn, c, zero=preserve))}


def dbb(conv, bn, preserve: bool) -> dict[str, nn.Module]:
    """DBB: k×k conv-BN + 1×1 conv-BN + 1×1 conv → BNAndPad → k×k conv (unpadded) → BN
    + 1×1 conv → BNAndPad → k×k average pool → BN. BNAndPad makes both exact at the border."""
    (ph, pw), (cin, c) = conv.padding, (conv.in_channels, conv.out_channels)
    if ph != pw:
        raise Refused(f"padding {conv.padding}: dbb pads with BN(0) by the same amount on both axes")
    if tuple(conv.dilation) != (1, 1):
        raise Refused(f"dilation {conv.dilation}: dbb's average pool cannot be dilated")
    return {"kxk": nn.Sequential(conv, bn),
            "conv1x1": _one_by_one(conv, bn, preserve),
            "conv1x1_kxk": nn.Sequential(
                _new_conv(conv, cin, cin, (1, 1), aligned=False), _new_bn(bn, cin, cls=BNAndPad, padding=ph),
                _new_conv(conv, cin, c, conv.kernel_size, stride=conv.stride, aligned=False),
                _new_bn(bn, c, zero=preserve)),
            "conv1x1_avg": nn.Sequential(
                _new_conv(conv, cin, c, (1, 1), aligned=False), _new_bn(bn, c, cls=BNAndPad, padding=ph),
                nn.AvgPool2d(conv.kernel_size, conv.stride, 0), _new_bn(bn, c, zero=preserve))}


def gcblock(conv, bn, preserve: bool, n_paths: int = 2) -> dict[str, nn.Module]:
    """GCNet's GCBlock for any k, groups and widths: n_paths × (k×k conv-BN → 1×1 conv-BN)
    + (1×1 conv-BN, the stride here → 1×1 conv-BN) + BN of x (where shapes allow). The first
    path holds the original conv → BN, then a 1×1 conv → BN that starts as the identity."""
    if not isinstance(n_paths, int) or n_paths < 1:
        raise ValueError(f"gcblock needs n_paths >= 1, got {n_paths!r}")
    cin, c = conv.in_channels, conv.out_channels
    first = [conv, bn, _new_conv(conv, c, c, (1, 1), aligned=False), _new_bn(bn, c)]
    if preserve:
        _as_identity(first[2], first[3])
    branches = {"path0": nn.Sequential(*first)}
    for i in range(1, n_paths):
        branches[f"path{i}"] = nn.Sequential(
            _new_conv(conv, cin, c, conv.kernel_size, stride=conv.stride, dilation=conv.dilation), _new_bn(bn, c),
            _new_conv(conv, c, c, (1, 1), aligned=False), _new_bn(bn, c, zero=preserve))
    branches["path_1x1"] = nn.Sequential(*_one_by_one(conv, bn, False),
                                         _new_conv(conv, c, c, (1, 1), aligned=False), _new_bn(bn, c, zero=preserve))
    if _same_shape(conv):
        branches["identity"] = _new_bn(bn, c, zero=preserve)
    return branches


RECIPES: dict[str, Callable] = {"repvgg": repvgg, "acnet": acnet, "dbb": dbb, "gcblock": gcblock}


# ---- the report ----

@dataclass(frozen=True)
class Expansion:
    path: str      # the conv's module path; its BN's path is `bn`
    bn: str
    recipe: str
    branches: str  # the block's branch names
    shape: str     # the conv's kernel, which the fused block has again


@dataclass
class ExpandReport:
    """What `expand` did: each conv → BN pair expanded, each conv left alone and why."""
    expanded: list[Expansion] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    before: Stats | None = None
    after: Stats | None = None
    max_rel_error: float | None = None  # eval mode, original vs expanded, on the example inputs

    def table(self) -> str:
        return stats_table({"original": self.before, "expanded": self.after})

    def __str__(self) -> str:
        lines = [self.table()]
        if self.max_rel_error is not None:
            lines.append(f"max relative error (eval mode, original vs expanded): {self.max_rel_error:.3g}")
        lines += [f"note: {n}" for n in self.notes]
        if self.expanded:
            lines.append(f"\n{len(self.expanded)} conv → BN pairs expanded:")
            lines += [f"  {e.recipe:<9} {e.path:<36} {e.shape:<22} {e.branches}" for e in self.expanded]
        if self.skipped:  # one line per reason where many convs share it
            lines.append(f"\n{len(self.skipped)} convs left alone:")
            by_reason = {}
            for s in self.skipped:
                by_reason.setdefault(s.reason, []).append(s.path)
            for reason, paths in by_reason.items():
                if len(paths) <= 3:
                    lines += [f"  {p:<46} {reason}" for p in paths]
                else:
                    lines.append(f"  {len(paths)} convs ({', '.join(paths[:2])}, ...): {reason}")
        if self.untraced:
            lines.append(f"\n{len(self.untraced)} modules could not be traced (their children were searched one by one):")
            lines += [f"  {u.path:<40} {u.message}" for u in self.untraced]
        return "\n".join(lines)


# ---- finding conv → BN pairs by data flow ----

@dataclass
class _Pair:
    conv: str
    bn: str | None   # None: left alone, `reason` says why
    reason: str = ""


def _is_layer(m, kinds) -> bool:
    return isinstance(m, kinds) and ops.plain(m)


_LINEAR_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.SyncBatchNorm, *ops.IDENTITY_MODULES)


def _graph_pairs(gm: fx.GraphModule) -> dict[str, _Pair]:
    """Each conv module the graph calls: its BN, or why it has none. Paths relative to gm."""
    modules = dict(gm.named_modules())
    calls = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    read = {n.target.rsplit(".", 1)[0] for n in gm.graph.nodes if n.op == "get_attr" and "." in n.target}
    module = lambda n: modules.get(n.target) if n.op == "call_module" else None
    linear = lambda n: n.op == "call_module" and _is_layer(module(n), _LINEAR_MODULES)

    def root(n):  # up a chain of single-use linear layers
        while isinstance(n, fx.Node) and linear(n) and len(n.users) == 1 and n.args:
            n = n.args[0]
        return n

    def summed_with_same_input(conv_node, bn_node) -> bool:
        end = bn_node
        while len(end.users) == 1 and linear(next(iter(end.users))):
            end = next(iter(end.users))
        if len(end.users) != 1 or not ops.is_op(top := next(iter(end.users)), ops.ADD | ops.SUB):
            return False
        while len(top.users) == 1 and ops.is_op(next(iter(top.users)), ops.ADD | ops.SUB):
            top = next(iter(top.users))
        leaves, todo = [], [top]
        while todo:
            n = todo.pop()
            for a in n.args:
                if isinstance(a, fx.Node) and ops.is_op(a, ops.ADD | ops.SUB) and len(a.users) == 1:
                    todo.append(a)
                elif isinstance(a, fx.Node) and a is not end:
                    leaves.append(a)
        return any(root(leaf) is root(conv_node) for leaf in leaves)

    pairs = {}
    for n in gm.graph.nodes:
        conv = module(n)
        if not isinstance(conv, nn.modules.conv._ConvNd):
            continue
        users = list(n.users)
        bn_node = users[0] if len(users) == 1 else None
        bn = module(bn_node) if bn_node is not None else None
        reason = ""
        if not _is_layer(conv, nn.Conv2d):
            reason = f"a {type(conv).__name__}, not a plain nn.Conv2d"
        elif calls[n.target] > 1:
            reason = f"called from {calls[n.target]} places"
        elif bn is None or not _is_layer(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or type(bn) is BNAndPad:
            what = ", ".join(u.name for u in users) or "nothing"
            reason = f"its output is read by {what}, not by one BatchNorm2d only"
        elif calls[bn_node.target] > 1:
            reason = f"its BN '{bn_node.target}' is called from {calls[bn_node.target]} places"
        elif bn_node.args[0] is not n or len(bn_node.args) != 1 or bn_node.kwargs:
            reason = "its BN reads more than the conv's output"
        elif n.target in read or bn_node.target in read:
            reason = "forward reads the conv's or its BN's parameters directly"
        elif summed_with_same_input(n, bn_node):
            reason = "already a branch of a linear multi-branch block on the same input (fuse merges it)"
        pairs[n.target] = _Pair(n.target, None if reason else bn_node.target, reason)
    return pairs


def _find_pairs(module: nn.Module, path: str, report: ExpandReport) -> dict[str, _Pair]:
    """Every conv → BN pair of `module` (at `path`), by full paths. Traced in training and in
    eval mode (forward may differ, e.g. auxiliary heads): a pair must be one in both. A module
    that cannot be traced is searched child by child, as are modules called as leaves (hooks)."""
    prefix = f"{path}." if path else ""
    graphs, errors = [], []
    modes = {m: m.training for m in module.modules()}
    try:
        for training in (True, False):
            module.train(training)
            try:
                graphs.append(trace.symbolic(module))
            except Exception as e:  # any tracer failure: search the children instead
                errors.append(f"{'train' if training else 'eval'} mode: {type(e).__name__}: {trace._first_line(e)}")
    finally:
        for m, mode in modes.items():
            m.training = mode
    if errors:
        report.untraced.append(Untraced(path or "<root>", "; ".join(errors)))
        found = {}
        for name, child in module.named_children():
            found.update(_find_pairs(child, prefix + name, report))
        return found
    found: dict[str, _Pair] = {}
    for gm in graphs:
        for rel, pair in _graph_pairs(gm).items():
            old = found.get(prefix + rel)
            new = _Pair(prefix + rel, pair.bn and prefix + pair.bn, pair.reason)
            if old is not None and old.bn != new.bn:
                new = _Pair(new.conv, None, old.reason or new.reason
                            or "its BN differs between training and eval mode")
            found[new.conv] = new
        for n in gm.graph.nodes:  # leaves the tracer did not enter (modules with hooks)
            sub = gm.get_submodule(n.target) if n.op == "call_module" else None
            if sub is not None and list(sub.children()) and not _is_layer(sub, _LINEAR_MODULES):
                for key, p in _find_pairs(sub, prefix + n.target, report).items():
                    found.setdefault(key, p)
    return found


# ---- the front door ----

def _select(select, path: str, conv: nn.Conv2d) -> bool:
    if select is None:
        return any(k > 1 for k in conv.kernel_size)
    if isinstance(select, str):
        return fnmatch.fnmatchcase(path, select)
    return bool(select(path, conv))


def _selected_reason(select) -> str:
    if select is None:
        return "1×1 kernel: left alone by default (select= includes it)"
    return f"not selected by select={select!r}" if isinstance(select, str) else "not selected by select="


class _Modes:
    """Every module of each model in eval mode inside the block, back to its own mode after."""

    def __init__(self, *models):
        self.modes = [(m, m.training) for model in models for m in model.modules()]

    def __enter__(self):
        for m, _ in self.modes:
            m.training = False

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def _probe(conv: nn.Conv2d, seed: int = 0) -> torch.Tensor:
    """A random input the conv takes, a few output positions wide in each axis."""
    size = [d * (k - 1) + 1 - 2 * p + 3 * s for k, d, p, s in zip(conv.kernel_size, conv.dilation,
                                                                    conv.padding, conv.stride)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, conv.in_channels, *(max(s, 1) for s in size), generator=g, dtype=torch.float64)
    return x.to(conv.weight)


def _build(recipe, conv, bn, preserve: bool, options) -> tuple[nn.Module, str]:
    """(the block for conv → bn, its branch names); Refused with a reason."""
    x = _probe(conv)
    with _Modes(conv, bn), torch.no_grad():
        want = bn(conv(x))
    conv, bn = copy.deepcopy(conv), copy.deepcopy(bn)  # a block that is refused changes nothing
    if callable(recipe):
        block = recipe(conv, bn, **options)
        if not isinstance(block, nn.Module):
            raise TypeError(f"the recipe {recipe!r} returned {type(block).__name__}, not an nn.Module")
        name = getattr(recipe, "__name__", type(recipe).__name__)
        setattr(block, MARKER, name)
        names = ", ".join(n for n, _ in block.named_children()) or type(block).__name__
    else:
        block = Branches(RECIPES[recipe](conv, bn, preserve, **options), recipe)
        names = " + ".join(block.branches)
    block.train(conv.training)
    try:
        with _Modes(block), torch.no_grad():
            got = block(x)
    except Exception as e:  # a user's block that does not take the conv's input
        raise Refused(f"the block fails on a {tuple(x.shape)} input: {type(e).__name__}: {trace._first_line(e)}")
    if got.shape != want.shape:
        raise Refused(f"the block gives shape {tuple(got.shape)} where the conv → BN gives {tuple(want.shape)}")
    err = rel_error(want, got)
    if preserve and err > 100 * torch.finfo(want.dtype).eps:
        raise Refused(f"the block computes another function at expansion (rel err {err:.2g}): start its new "
                      "branches at zero, or pass preserve_function=False")
    return block, names


def expand_with_report(model: nn.Module, recipe: str | Callable = "gcblock", *, example_inputs=None,
                       preserve_function: bool = True, inplace: bool = False, select=None,
                       **options) -> tuple[nn.Module, ExpandReport]:
    """`expand`, and what it expanded, what it left alone and why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparam.expand expects a torch.nn.Module, got {type(model).__name__}")
    if not callable(recipe) and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: one of {sorted(RECIPES)}, or a callable (conv, bn) -> nn.Module")
    if not callable(recipe):
        try:  # each recipe's keyword options (gcblock: n_paths)
            inspect.signature(RECIPES[recipe]).bind(None, None, preserve_function, **options)
        except TypeError:
            raise TypeError(f"recipe {recipe!r} takes no option(s) {sorted(options)}") from None
    done = [(p or "<root>", getattr(m, MARKER)) for p, m in model.named_modules() if getattr(m, MARKER, None)]
    if done:
        raise ValueError(f"reparam.expand: the model is already expanded ('{done[0][0]}' is a block of recipe "
                         f"'{done[0][1]}'): fuse it with reparam.fuse, or expand the original model")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    work = model if inplace else copy.deepcopy(model)
    report = ExpandReport()
    where, order = {}, {}
    for p, m in work.named_modules(remove_duplicate=False):
        order.setdefault(p, len(order))
        where.setdefault(id(m), []).append(p)
    pairs = _find_pairs(work, "", report)
    for p, m in work.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and p not in pairs:
            pairs[p] = _Pair(p, None, "not called in a traced forward" if not report.untraced else
                             "not seen in a traced graph (see the modules that could not be traced)")
    name = recipe if isinstance(recipe, str) else getattr(recipe, "__name__", "custom")
    for pair in sorted(pairs.values(), key=lambda q: order.get(q.conv, 0)):
        conv = work.get_submodule(pair.conv)
        reason = pair.reason
        if not reason:
            bn = work.get_submodule(pair.bn)
            if len(where[id(conv)]) > 1 or len(where[id(bn)]) > 1:
                reason = "registered at more than one path: " + ", ".join(where[id(conv)] + where[id(bn)])
            elif trace.has_hooks(conv) or trace.has_hooks(bn):
                reason = "the conv or its BN has forward hooks"
            elif conv.padding_mode != "zeros":
                reason = f"padding_mode '{conv.padding_mode}' is not zero padding (fuse cannot merge it)"
            elif isinstance(conv.padding, str):
                reason = f"padding='{conv.padding}': give the padding in numbers"
            elif bn.running_mean is None:
                reason = "its BN has no running statistics (fuse cannot fold it)"
            elif not _select(select, pair.conv, conv):
                reason = _selected_reason(select)
        if not reason:
            try:
                block, names = _build(recipe, conv, bn, preserve_function, options)
            except Refused as e:
                reason = str(e)
        if reason:
            report.skipped.append(Skip(name, pair.conv, reason))
            continue
        _replace(work, pair.conv, block)
        _replace(work, pair.bn, nn.Identity())
        kernel = "×".join(map(str, conv.weight.shape))
        report.expanded.append(Expansion(pair.conv, pair.bn, name, names,
                                         f"{kernel} s{conv.stride[0]} g{conv.groups}"))
    if not preserve_function:
        report.notes.append("preserve_function=False: the new branches start from torch's default initialisation")
    with _Modes(model, work), torch.no_grad():
        report.before, report.after = count(model), count(work)
        if inputs is not None:
            clone = lambda: tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
            report.before, want = run_counted(model, clone())
            report.after, got = run_counted(work, clone())
            report.max_rel_error = rel_error(want, got)
    return work, report


def _replace(model: nn.Module, path: str, new: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def expand(model: nn.Module, recipe: str | Callable = "gcblock", *, example_inputs=None,
           preserve_function: bool = True, inplace: bool = False, select=None, **options) -> nn.Module:
    """A training form of `model` in which every eligible conv → BN pair is a re-parameterizable
    multi-branch block; `reparam.fuse` of it runs as many convs, of the same shapes, as
    `reparam.fuse(model)`.

    recipe: "repvgg" (k×k + 1×1 + identity BN), "acnet" (k×k + 1×k + k×1), "dbb" (k×k + 1×1 +
    1×1→k×k + 1×1→avg, exact at the border), "gcblock" (n_paths × (k×k→1×1) + (1×1→1×1) +
    identity BN; option `n_paths`, default 2), or a callable `(conv, bn) -> nn.Module` that
    returns a block computing, from (N, C_in, H, W), the conv → BN's (N, C_out, H', W').
    preserve_function: the new branches start at zero (the first path's extra 1×1 of gcblock as
    the identity), so the expanded model's eval-mode function is the model's; False: torch's
    default initialisation. The original conv and BN are always the first branch.
    select: which convs are eligible: a glob on the module path ("layer3.*"), or a callable
    `(path, conv) -> bool` (kernel size, groups, ...); None: every conv with a kernel wider than 1.
    example_inputs: optional; with them the report counts the ops one forward runs and the
    largest relative difference between the model and the expanded model in eval mode.
    The model is copied unless `inplace=True`; it keeps its class and code: each expanded conv's
    module becomes the block, its BN's module `nn.Identity`. An expanded model is refused."""
    return expand_with_report(model, recipe, example_inputs=example_inputs, preserve_function=preserve_function,
                              inplace=inplace, select=select, **options)[0]
