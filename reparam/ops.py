"""The only code that reads or writes torch.fx nodes.

`Graph` wraps a GraphModule being rewritten: it tells what a node computes when that is linear
(`linear_of`: a spec from `algebra` and the node it reads), and it applies the `Rewrite` values
that rules return. Targets are listed for both front ends: torch-level calls from
`symbolic_trace` and ATen calls from `torch.export`.
"""
from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from . import algebra
from .algebra import Affine, ConvSpec, Crop, Pool, Reason
from .nn import BNAndPad, ChannelAffine

aten = torch.ops.aten

ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor, "add", "add_"}
SUB = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor, "sub", "sub_"}
MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, "mul"}
DIV = {operator.truediv, torch.div, aten.div.Tensor, "div"}
NEG = {operator.neg, torch.neg, aten.neg.default, "neg"}
CAT = {torch.cat, torch.concat, aten.cat.default}
INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
            aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
            aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
LINEAR_FNS = {F.linear, aten.linear.default}
AVGPOOL_FNS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
               aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}
DROPOUT_FNS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
               F.feature_alpha_dropout, aten.dropout.default}
IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_RESHAPE_OF = {"view": "reshape", "view_as": "reshape_as"}
CONST_PREFIX = "_reparam_const_"  # the buffers holding constants that rewrites make
IDENTITY_FNS = {torch.clone, aten.clone.default, aten.alias.default, torch.detach}
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.AlphaDropout, nn.FeatureAlphaDropout)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
RESIZE_FNS = {F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest}
_RANDOM = ("rand", "dropout", "bernoulli", "normal", "multinomial", "poisson")


def is_op(node: fx.Node, targets) -> bool:
    return node.op in ("call_function", "call_method") and _hashable(node.target) in targets


def _hashable(t):
    try:
        hash(t)
        return t
    except TypeError:
        return None


def arg(node: fx.Node, i: int, name: str, default=None):
    """Argument `i` of a call, passed by position or by keyword `name`."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def source(node: fx.Node):
    """The tensor an op reads first: `input` of a layer or functional, `self` of a method."""
    return arg(node, 0, "input", arg(node, 0, "self"))


def static(*values) -> bool:
    """No value is (or holds) a graph node: sizes known when tracing, not read from a tensor."""
    found = []
    fx.node.map_arg(values, found.append)
    return not found


# torch layers whose eval-mode function the rules know; a subclass that overrides `forward`
# (QAT convs, timm's Conv2dSame) computes something else and is not folded as the layer
KNOWN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                nn.BatchNorm3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Upsample, *IDENTITY_MODULES)


def plain(m: nn.Module) -> bool:
    """`m` computes what the torch layer it derives from computes."""
    base = next((b for b in KNOWN_LAYERS if isinstance(m, b)), None)
    return base is not None and all(getattr(type(m), f, None) is getattr(base, f, None)
                                    for f in ("forward", "_conv_forward"))


@dataclass
class NewConv:
    """A conv to create: `spec` applied to `input`, replacing `replaces`."""
    spec: ConvSpec
    input: fx.Node
    replaces: list[fx.Node]


@dataclass
class Constant:
    value: torch.Tensor


@dataclass
class Rewrite:
    """Replace `output` by the sum (or channel concat) of `terms`; erase what becomes dead."""
    rule: str
    output: fx.Node
    terms: list[tuple[NewConv | Constant | fx.Node, float]]
    erase: list[fx.Node]
    detail: str = ""
    cat_dim: int | None = None  # concatenate the terms along this dim instead of summing
    # convs that each take the place of the node they replace (replaces[0], same shape)
    substitute: list[NewConv] = field(default_factory=list)
    # the self-check's limit on the relative error (None: float64 rounding only), for rules that
    # match values to the model's own precision
    tolerance: float | None = None


@dataclass(frozen=True)
class Refusal:
    rule: str
    node: fx.Node
    reason: str


@dataclass
class Graph:
    gm: fx.GraphModule
    max_macs_ratio: float = 1.0  # a merge may cost at most this times the MACs it replaces
    prefix: str = ""  # where `gm` sits in the user's model ("" or "body.")
    modules: dict[str, nn.Module] = field(init=False)
    calls: Counter = field(init=False)
    const_count: int = 0
    _specs: dict = field(default_factory=dict)
    # ops made while fusing, by module name: their modules are made in `cleanup`
    _pending: dict = field(default_factory=dict)
    _f64: dict = field(default_factory=dict)

    def __post_init__(self):
        self.modules = dict(self.gm.named_modules())
        self.calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        held = [t for t in [*self.gm.parameters(), *self.gm.buffers()] if t.is_floating_point()]
        self.dtype = held[0].dtype if held else torch.get_default_dtype()
        self.device = held[0].device if held else torch.device("cpu")
        self.on_meta = any(t.is_meta for t in [*self.gm.parameters(), *self.gm.buffers()])
        infer_ranks(self.gm.graph, self.modules)

    # ---- reading ----
    def float64_state(self, name: str) -> dict[str, torch.Tensor]:
        """The parameters and buffers of module `name` in float64 (for `check`), made once."""
        if name not in self._f64:
            self._f64[name] = {k: v.double() if v.is_floating_point() else v
                               for k, v in self.modules[name].state_dict(keep_vars=True).items()}
        return self._f64[name]

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def const(self, a):
        """The value of a constant argument (a get_attr tensor or a Python number), else None."""
        if isinstance(a, fx.Node):
            if a.op != "get_attr":
                return None
            obj = self.gm
            for part in a.target.split("."):
                obj = getattr(obj, part)
            return obj if isinstance(obj, torch.Tensor) else None
        return a if isinstance(a, (int, float)) and not isinstance(a, bool) else None

    def is_const(self, a) -> bool:
        return self.const(a) is not None

    def path(self, node: fx.Node) -> str:
        return module_path(node)

    def label(self, node: fx.Node) -> str:
        """`node` as the report names it: its module's path in the user's model, else its name."""
        return self.prefix + (self.path(node) or node.name)

    def paths(self, node: fx.Node) -> set[str]:
        return set(node.meta.get("reparam_paths", ())) or {self.path(node)}

    @staticmethod
    def shape(node: fx.Node):
        """`node`'s output shape where shape propagation or torch.export recorded it (sizes
        torch.export lets vary stay symbolic)."""
        meta = node.meta.get("tensor_meta")
        shape = meta.shape if meta is not None and hasattr(meta, "shape") else None
        val = node.meta.get("val")
        if shape is None and isinstance(val, torch.Tensor):
            shape = val.shape
        return None if shape is None else tuple(int(s) if is_concrete_int(s) else s for s in shape)

    @staticmethod
    def size_hint(node: fx.Node) -> tuple[int, ...] | None:
        """`node`'s shape in the example the graph was recorded with."""
        shape = Graph.shape(node)
        return None if shape is None else tuple(s if isinstance(s, int) else s.node.hint for s in shape)

    def ndim(self, node: fx.Node) -> int | None:
        """`node`'s rank: recorded with example inputs, else implied by the model (`infer_ranks`)."""
        shape = self.shape(node)
        return len(shape) if shape is not None else node.meta.get("reparam_rank")

    def channels(self, node: fx.Node, nd: int) -> int | None:
        """The channel count of `node`'s output (dim 1, or the last dim where nd == 0), if known."""
        shape = self.shape(node)
        if shape is None or len(shape) < 2:
            return None
        c = shape[-1] if nd == 0 else shape[1]
        return c if isinstance(c, int) else None

    def holds_conv(self, node: fx.Node) -> bool:
        """A convolution or Linear of the original model, or a conv made from one."""
        if node.op == "call_module":
            return node.meta.get("reparam_conv", isinstance(self.module(node), CONV_MODULES))
        return is_op(node, CONV_FNS) or is_op(node, LINEAR_FNS)

    def resized(self, node: fx.Node) -> fx.Node | None:
        """The tensor `node` resizes (interpolate / upsample, any mode), else None. Each output
        is a combination of its channel's inputs with weights summing to 1, so a per-channel
        affine map commutes with it."""
        if node.op == "call_module" and isinstance(self.module(node), nn.Upsample) and plain(self.module(node)):
            return source(node)
        t = node.target
        aten_resize = isinstance(t, torch._ops.OpOverload) and t.name().split("::")[-1].lstrip("_") \
            .startswith("upsample_")
        if node.op == "call_function" and (aten_resize or _hashable(t) in RESIZE_FNS):
            x = arg(node, 0, "input")
            return x if isinstance(x, fx.Node) else None
        return None

    def readers(self, node: fx.Node, same_shape=False) -> list[fx.Node]:
        """The users that read `node`'s value. The others only ask its rank, dtype or device (and
        shape, where `same_shape` says the rewrite keeps it): `apply` moves those to the result."""
        return [u for u in node.users if not _reads_meta(u, node, same_shape)]

    def single_use(self, node: fx.Node, user: fx.Node | None = None, *, same_shape=False) -> bool:
        readers = self.readers(node, same_shape)
        return len(readers) == 1 and (user is None or readers[0] is user)

    def shared(self, node: fx.Node) -> Reason | None:
        if node.op == "call_module" and self.calls[node.target] > 1:
            return (f"module '{node.target}' is called from {self.calls[node.target]} places; "
                    "fusing one call would untie its weights")
        return None

    def linear_of(self, node: fx.Node):
        """(spec, input node) when `node` computes a linear map of one input; a reason when it
        looks like one but is not exact to treat as such; None when it is something else."""
        if reason := self.shared(node):
            return reason if self._linear(node) is not None else None
        return self._linear(node)

    def _linear(self, node: fx.Node):
        # weights never change while fusing: each node's spec is computed once
        if node not in self._specs:
            self._specs[node] = self._linear_uncached(node)
        return self._specs[node]

    def _linear_uncached(self, node: fx.Node):
        if node.op == "call_module":
            return self._module_linear(node)
        if node.op not in ("call_function", "call_method"):
            return None
        t = _hashable(node.target)
        if t in CONV_FNS:
            return self._conv_fn(node, CONV_FNS[t])
        if t in LINEAR_FNS:
            w, b = self.const(arg(node, 1, "weight")), self.const(arg(node, 2, "bias"))
            if w is None or (arg(node, 2, "bias") is not None and b is None):
                return None
            return algebra.conv_spec(w, b), source(node)
        if t in (F.batch_norm, aten.batch_norm.default):
            return self._bn_fn(node, t)
        if t in AVGPOOL_FNS:
            return self._pool(source(node), AVGPOOL_FNS[t], arg(node, 1, "kernel_size"),
                              arg(node, 2, "stride"), arg(node, 3, "padding", 0),
                              arg(node, 4, "ceil_mode", False),
                              arg(node, 5, "count_include_pad", True),
                              arg(node, 6, "divisor_override"))
        if t is operator.getitem or t is aten.slice.Tensor:
            return self._crop(node, t)
        if t in MUL or t in DIV or t in NEG:
            return self._scale(node, t)
        if t in ADD or t in SUB:
            return self._shift(node, t)
        return None

    def _module_linear(self, node):
        m, x = self.module(node), source(node)
        if m is None or not (plain(m) or isinstance(m, (BNAndPad, ChannelAffine))):
            return None
        if m._forward_hooks or m._forward_pre_hooks:
            return "the module has forward hooks: fused, they would no longer fire"
        if isinstance(m, ChannelAffine):
            return m.spec(), x
        if isinstance(m, nn.Linear):
            return algebra.conv_spec(m.weight, m.bias), x
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if m.padding_mode != "zeros" and any(_padding(m.padding, m.kernel_size, m.dilation) or [1]):
                return f"padding_mode '{m.padding_mode}' is not zero padding"
            pad = _padding(m.padding, m.kernel_size, m.dilation)
            if pad is None:
                return "padding='same' with an even kernel pads asymmetrically"
            return algebra.conv_spec(m.weight, m.bias, m.stride, pad, m.dilation, m.groups), x
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is None or m.running_var is None:
                return "BatchNorm without running statistics normalizes with batch statistics"
            scale, shift = algebra.bn_affine(m.running_mean, m.running_var,
                                             m.weight if m.affine else None,
                                             m.bias if m.affine else None, m.eps)
            if isinstance(m, BNAndPad):
                spec = algebra.as_conv(Affine(scale, shift), scale.numel(), 2)
                return ConvSpec(spec.weight, spec.bias, (1, 1), (m.padding,) * 2, (1, 1),
                                spec.groups), x
            nd = 2 if isinstance(m, nn.BatchNorm2d) else 3 if isinstance(m, nn.BatchNorm3d) else None
            return Affine(scale, shift, nd), x
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
            return self._pool(x, nd, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                              m.count_include_pad, getattr(m, "divisor_override", None))
        return None

    def _conv_fn(self, node, nd):
        w = self.const(arg(node, 1, "weight"))
        b_arg = arg(node, 2, "bias")
        b = self.const(b_arg)
        if w is None or (b_arg is not None and b is None):
            return None  # a weight computed from the input is not a fixed linear map
        stride, padding, dilation, groups = (arg(node, 3, "stride", 1), arg(node, 4, "padding", 0),
                                             arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1))
        if not static(stride, padding, dilation, groups):
            return None  # sizes read from a tensor: not one fixed conv
        k = tuple(w.shape[2:])
        d = _tuple(dilation, nd)
        pad = _padding(padding, k, d)
        if pad is None:
            return "padding='same' with an even kernel pads asymmetrically"
        return algebra.conv_spec(w, b, _tuple(stride, nd), pad, d, groups), source(node)

    def _bn_fn(self, node, t):
        if t is F.batch_norm:  # (input, running_mean, running_var, weight, bias, training, momentum, eps)
            names = [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"),
                     (5, "training"), (7, "eps")]
            defaults = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
        else:  # aten: (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
            names = [(3, "running_mean"), (4, "running_var"), (1, "weight"), (2, "bias"),
                     (5, "training"), (7, "eps")]
            defaults = {"training": False, "eps": 1e-5}
        a = {n: arg(node, i, n, defaults.get(n)) for i, n in names}
        if a["training"]:
            return "batch_norm with training=True uses batch statistics"
        vals = {n: self.const(a[n]) for n in ("running_mean", "running_var", "weight", "bias")}
        if vals["running_mean"] is None or vals["running_var"] is None:
            return "batch_norm without constant running statistics"
        if any(a[n] is not None and vals[n] is None for n in ("weight", "bias")):
            return None
        if not static(a["eps"]):
            return None
        scale, shift = algebra.bn_affine(vals["running_mean"], vals["running_var"],
                                         vals["weight"], vals["bias"], a["eps"])
        return Affine(scale, shift, None), source(node)

    def _pool(self, x, nd, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
        if not static(kernel, stride, padding, ceil_mode, count_include_pad, divisor):
            return None  # a window read from the input's size (squeeze-excite's global pool)
        k = _tuple(kernel, nd)
        s = _tuple(stride if stride not in (None, []) else kernel, nd)
        p = _tuple(padding, nd)
        if ceil_mode:
            return "AvgPool with ceil_mode=True has partial windows at the border"
        if any(p) and not count_include_pad and divisor is None:
            return ("AvgPool with count_include_pad=False divides border windows by fewer "
                    "elements: not a convolution")
        return Pool(k, s, p, float(divisor or math.prod(k))), x

    def _crop(self, node, t):
        """x[:, :, r:-r, ...] (every entry given) or aten.slice(x, dim, r, -r): a Crop."""
        x = node.args[0]
        if not isinstance(x, fx.Node) or not static(*node.args[1:]):
            return None
        rank = self.ndim(x)
        if t is operator.getitem:
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            rank = rank or len(idx)
            if len(idx) != rank or rank < 3 or not all(isinstance(i, slice) for i in idx):
                return None
            cuts = [_cut(i.start, i.stop, i.step) for i in idx]
        else:
            if rank is None:
                return None
            dim, start, end, step = (list(node.args[1:]) + [0, None, 1])[:4]
            cuts = [0] * rank
            hint = self.size_hint(x)
            cuts[dim % rank] = _cut(start, end, step, hint[dim % rank] if hint else None)
        if rank < 3 or any(c is None for c in cuts) or cuts[0] or cuts[1] or not any(cuts):
            return None
        return Crop(tuple(cuts[2:])), x

    def _scale(self, node, t):
        args = [a for a in node.args[:2]]
        if t in NEG:
            return (Affine(torch.tensor(-1.0, dtype=torch.float64)), args[0]) \
                if isinstance(args[0], fx.Node) else None
        if len(args) != 2 or node.kwargs:
            return None
        consts = [self.const(a) for a in args]
        if t in DIV:  # x / c only
            if consts[0] is not None or consts[1] is None or not isinstance(args[0], fx.Node):
                return None
            c = consts[1]
            return _affine(1.0 / (c.double() if isinstance(c, torch.Tensor) else float(c)), None,
                           self.shape(args[0])), args[0]
        for i in (0, 1):
            if consts[1 - i] is not None and isinstance(args[i], fx.Node) and consts[i] is None:
                return _affine(consts[1 - i], None, self.shape(args[i])), args[i]
        return None

    def _shift(self, node, t):
        """x + c and x - c with a constant c: an affine map. (Sums of tensors are merge_sum's.)"""
        if len(node.args) != 2 or node.kwargs:
            return None
        a, b = node.args
        ca, cb = self.const(a), self.const(b)
        if isinstance(a, fx.Node) and ca is None and cb is not None:
            return _affine(1.0, cb if t in ADD else -cb, self.shape(a)), a
        if isinstance(b, fx.Node) and cb is None and ca is not None and t in ADD:
            return _affine(1.0, ca, self.shape(b)), b
        return None

    def held(self, nodes) -> list[tuple[torch.dtype, torch.device, bool]]:
        """(dtype, device, has dims) of the floating tensors the nodes hold: weights, buffers,
        constants, convs made while fusing."""
        out = []
        for n in nodes:
            if n.op == "call_module" and n.target in self._pending:
                out.append(self._pending[n.target].dtype_device + (True,))
                continue
            tensors = [*self.module(n).parameters(), *self.module(n).buffers()] if n.op == "call_module" else []
            tensors += [self.const(a) for a in n.all_input_nodes]
            out += [(t.dtype, t.device, t.dim() > 0) for t in tensors
                    if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return out

    def dtype_device(self, nodes) -> tuple[torch.dtype, torch.device] | Reason:
        """dtype and device of the op that replaces `nodes`: those of the tensors they hold (0-dim
        ones only where there are no others, as type promotion ranks them); where they hold none,
        the dtype shapes recorded, else the model's, on the model's device. A reason where the
        tensors' dtypes or devices differ: merged, the result's dtype would change."""
        held = self.held(nodes)
        held = [h for h in held if h[2]] or held
        kinds = {(d, dev) for d, dev, _ in held}
        if len(kinds) > 1:
            kinds = ", ".join(sorted(f"{str(d).removeprefix('torch.')} on {dev}" for d, dev in kinds))
            return f"the ops hold tensors of different dtypes or devices ({kinds}): merged, the result's would change"
        if kinds:
            return kinds.pop()
        for n in nodes:
            meta = n.meta.get("val", n.meta.get("tensor_meta"))
            if getattr(meta, "dtype", None) is not None:
                return meta.dtype, self.device
        return self.dtype, self.device

    def admissible(self, rw: Rewrite) -> Reason | None:
        """Why the ops `rw` would make cannot stand in this graph, or None."""
        for new in rw.substitute + [t for t, _ in rw.terms if isinstance(t, NewConv)]:
            got = self.dtype_device(new.replaces)
            if isinstance(got, str):
                return got
            if new.spec.nd and min(new.spec.padding) < 0:
                return f"the merged conv would need negative padding {new.spec.padding}"
            if not any(self.holds_conv(n) for n in new.replaces) and algebra.per_channel(new.spec) is None:
                return "no op it merges is a convolution or linear layer: merged, they would run one more"
        return None

    # ---- writing ----
    def apply(self, rw: Rewrite) -> fx.Node:
        graph = self.gm.graph
        out = rw.output
        order = {n: i for i, n in enumerate(graph.nodes)}
        vals, made = [], {}  # made: replaced node -> the new conv standing for it
        for new in rw.substitute:
            node = self._add_conv(new, min(new.replaces, key=order.__getitem__))
            old = new.replaces[0]
            node.meta.update({k: old.meta[k] for k in ("tensor_meta", "val", "reparam_rank") if k in old.meta})
            self._replace_uses(old, node)
            made[old] = node
        for term, coef in rw.terms:
            if isinstance(term, NewConv):
                # where the first op it replaces was: it reads the value that op read
                node = self._add_conv(term, min(term.replaces, key=order.__getitem__))
                if "reparam_rank" in out.meta:
                    node.meta["reparam_rank"] = out.meta["reparam_rank"]
                made.update((r, node) for r in term.replaces)
                term = node
            elif isinstance(term, Constant):
                value = term.value
                dtype = getattr(out.meta.get("val", out.meta.get("tensor_meta")), "dtype", None)
                if value.is_floating_point() and dtype is not None and dtype.is_floating_point:
                    value = value.to(dtype)  # computed in float64: the dtype it stands for
                with graph.inserting_before(out):
                    term = self._add_const(value)
            vals.append((term, coef))
        with graph.inserting_before(out):
            result = self._combine(vals, rw.cat_dim)
        for key in ("tensor_meta", "val", "reparam_rank"):
            if key in out.meta and key not in result.meta:
                result.meta[key] = out.meta[key]
        self._replace_uses(out, result)
        pending = [n for n in dict.fromkeys(rw.erase) if n.graph is graph and n is not result]
        for n in pending:
            for u in list(n.users):  # the rule vouched that these only read metadata
                to = made.get(n, result)
                if _reads_meta(u, n, True) and _precedes(to, u):
                    self._replace_uses(n, to, only=u)
        while erasable := [n for n in pending if not n.users]:  # users first, then their inputs
            for n in erasable:
                if n.op == "call_module":
                    self.calls[n.target] -= 1
                graph.erase_node(n)
            pending = [n for n in pending if n not in erasable]
        return result

    def _replace_uses(self, old: fx.Node, new: fx.Node, only: fx.Node | None = None):
        """Users of `old` (or just `only`) read `new`; their cached linear views follow."""
        for u in [only] if only is not None else list(old.users):
            got = self._specs.get(u)
            if isinstance(got, tuple) and got[1] is old:
                self._specs[u] = (got[0], new)
            u.replace_input_with(old, new)

    def _combine(self, vals, cat_dim) -> fx.Node:
        """Σ coef·term as add/sub/mul nodes, or their concatenation along `cat_dim`."""
        graph = self.gm.graph
        if cat_dim is not None:
            return graph.call_function(torch.cat, ([v for v, _ in vals],), {"dim": cat_dim})
        result = None
        for v, c in vals:
            if c not in (1.0, -1.0):
                v, c = graph.call_function(operator.mul, (v, c)), 1.0
            if result is None:
                result = v if c == 1.0 else graph.call_function(operator.neg, (v,))
            else:
                result = graph.call_function(operator.add if c == 1.0 else operator.sub, (result, v))
        return result

    def _add_conv(self, new: NewConv, before: fx.Node) -> fx.Node:
        """A call of the op `new` describes, before `before`. Its module is made in `cleanup`,
        so a chain of rewrites rounds to the model's dtype once, at the end."""
        dtype, device = self.dtype_device(new.replaces)
        paths = set().union(*(self.paths(n) for n in new.replaces))
        name = self._name_for(new.replaces, paths)
        conv = any(self.holds_conv(n) for n in new.replaces)
        weights = [p for n in new.replaces if n.op == "call_module" and n.target not in self._pending
                   for p in self.module(n).parameters()]
        grad = any(p.requires_grad for p in weights) or not weights and any(
            self._pending[n.target].requires_grad for n in new.replaces if n.target in self._pending)
        last = any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                   for p in weights)
        self._pending[name] = Pending(new.spec, (dtype, device), conv, grad, last)
        self.modules[name] = None
        node = self.gm.graph.create_node("call_module", name, (new.input,), {})
        before.prepend(node)
        self.calls[name] += 1
        self._specs[node] = (new.spec, new.input)
        node.meta["reparam_paths"] = sorted(paths)
        node.meta["reparam_new"] = True
        node.meta["reparam_conv"] = conv
        return node

    def _name_for(self, nodes, paths) -> str:
        """Keep the name of the one conv being folded into; else '<deepest common scope>.reparam'."""
        convs = [n for n in nodes if n.op == "call_module" and
                 (n.target in self._pending and self._pending[n.target].conv or
                  isinstance(self.module(n), CONV_MODULES))]
        if len(convs) == 1:
            t = convs[0].target
            attrs = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target.startswith(t + ".")]
            if self.calls[t] == 1 and not attrs:
                return t
        scope = common_scope(paths)
        base = f"{scope}.reparam" if scope else "reparam"
        name, i = base, 0
        while self._exists(name):
            i += 1
            name = f"{base}_{i}"
        return name

    def _exists(self, name: str) -> bool:
        if name in self._pending:
            return True
        try:
            self.gm.get_submodule(name)
            return True
        except AttributeError:
            return hasattr(self.gm, name)

    def _add_const(self, value: torch.Tensor) -> fx.Node:
        name = f"{CONST_PREFIX}{self.const_count}"
        while hasattr(self.gm, name):
            self.const_count += 1
            name = f"{CONST_PREFIX}{self.const_count}"
        self.gm.register_buffer(name, value.detach().clone())
        return self.gm.graph.get_attr(name)

    def relax_views(self):
        """`view` as `reshape`: a merged op's output may have another memory format than the ops
        it replaced (a conv of a channels-last input is channels-last), where `view` raises. In a
        graph that writes nothing in place (functionalized), reshape computes the same: a view
        wherever `view` gives one, a copy elsewhere."""
        for n in self.gm.graph.nodes:
            if n.op == "call_method" and n.target in _RESHAPE_OF and not any(isinstance(a, torch.dtype) for a in n.args):
                n.target = _RESHAPE_OF[n.target]
            elif n.op == "call_function" and n.target is torch.ops.aten.view.default:
                n.target = torch.ops.aten.reshape.default

    def cleanup(self):
        """Make the modules of the ops made while fusing; drop what nothing uses any more."""
        graph = self.gm.graph
        for n in list(graph.nodes):
            if n.op == "get_attr" and not n.users:
                graph.erase_node(n)
        used = {n.target for n in graph.nodes if n.op == "get_attr"}
        for name, _ in list(self.gm.named_buffers(recurse=False)):
            if name.startswith(CONST_PREFIX) and name not in used:
                delattr(self.gm, name)
        for name in {n.target for n in graph.nodes if n.op == "call_module"} & self._pending.keys():
            self.gm.add_submodule(name, self._pending[name].module())
        graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()


@dataclass(frozen=True)
class Pending:
    """An op made while fusing: its float64 spec, and how to make its module."""
    spec: ConvSpec
    dtype_device: tuple
    conv: bool            # it stands for a convolution (else a per-channel affine map)
    requires_grad: bool
    channels_last: bool

    def module(self) -> nn.Module:
        m = make_module(self.spec, *self.dtype_device, conv=self.conv)
        for p in m.parameters():
            p.requires_grad_(self.requires_grad)
            if self.channels_last and p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        return m


# layers whose output has their input's rank; those that also fix it
_SAME_RANK = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._AvgPoolNd,
              nn.modules.pooling._MaxPoolNd, nn.Upsample, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish,
              nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Mish, nn.ELU, nn.PReLU, ChannelAffine,
              *IDENTITY_MODULES)
_FIXED_RANK = ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))  # they raise on any other rank
_SAME_RANK_FNS = {F.relu, F.relu6, F.hardswish, F.silu, F.gelu, F.leaky_relu, torch.relu, torch.sigmoid,
                  torch.tanh, F.interpolate, F.batch_norm, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.pad,
                  *CONV_FNS, *DROPOUT_FNS}
_SAME_RANK_METHODS = {"relu", "sigmoid", "tanh", "clamp", "contiguous", "clone", "detach", "float", "to"}


def infer_ranks(graph: fx.Graph, modules: dict):
    """Ranks the model itself implies, without example inputs: a BatchNorm2d's input is 4-D,
    and so is whatever reaches it through ops that keep ranks (convs, activations, pools,
    sums with numbers, channel concatenations). Stored as node.meta['reparam_rank']."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n):
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    def join(a, b):
        parent[find(a)] = find(b)

    seeds = {}
    for n in graph.nodes:
        x = source(n) if n.op in ("call_module", "call_function", "call_method") else None
        if not isinstance(x, fx.Node):
            continue
        m = modules.get(n.target) if n.op == "call_module" else None
        keeps = (isinstance(m, _SAME_RANK) or (n.op == "call_function" and _hashable(n.target) in _SAME_RANK_FNS)
                 or (n.op == "call_method" and n.target in _SAME_RANK_METHODS)
                 or ((is_op(n, ADD) or is_op(n, SUB) or is_op(n, MUL)) and len(n.args) == 2
                     and not any(isinstance(a, fx.Node) for a in n.args[1:])))
        if keeps:
            join(n, x)
        if is_op(n, CAT) and isinstance(n.args[0], (list, tuple)):
            for t in n.args[0]:
                if isinstance(t, fx.Node):
                    join(n, t)
        for cls, rank in _FIXED_RANK:
            if isinstance(m, cls):
                seeds[n] = rank
    ranks = {find(n): r for n, r in seeds.items()}
    for n in graph.nodes:
        r = ranks.get(find(n))
        if r is not None:
            n.meta["reparam_rank"] = r


def module_path(node: fx.Node) -> str:
    """The module a node belongs to, as a dotted path ('' for the root)."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def where(node: fx.Node) -> str:
    """A name for `node` in a report: its module's path, and 'module:op' where it is no module."""
    path = module_path(node)
    if node.op == "call_module":
        return path
    return f"{path}:{node.name}" if path else node.name


def common_scope(paths) -> str:
    """The deepest module path that holds every one of `paths` ('' for the root)."""
    common = []
    for level in zip(*(p.split(".") if p else [] for p in paths)):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    """Whether `a` comes before `b` in their graph."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


_RANK_META = {"ndim", "dtype", "device", "is_cuda", "dim", "ndimension"}
_SHAPE_META = {"shape", "size"}
_SHAPE_OF = {"reshape_as", "view_as", "expand_as"}


def _reads_meta(user: fx.Node, node: fx.Node, shape_too: bool) -> bool:
    """`user` reads only `node`'s rank/dtype/device (or shape), never its values."""
    names = _RANK_META | (_SHAPE_META if shape_too else set())
    if user.op == "call_function" and user.target is getattr and user.args[0] is node:
        return user.args[1] in names
    if user.op == "call_method" and user.target in names and user.args[0] is node:
        return node not in user.args[1:] and node not in user.kwargs.values()
    if shape_too and user.op == "call_method" and user.target in _SHAPE_OF and len(user.args) == 2:
        return user.args[1] is node and user.args[0] is not node  # z.reshape_as(node): its shape
    return False


def _affine(c, shift, x_shape=None):
    """Affine of a multiplier c (number or tensor) and optional shift, applied to a tensor of
    shape `x_shape` (where known): per-channel (dim 1, or the last dim: nd == 0) or scalar; None
    where the constants broadcast the tensor to another shape or scale another axis."""
    scale = torch.as_tensor(c, dtype=torch.float64)
    shift = None if shift is None else torch.as_tensor(shift, dtype=torch.float64)
    shape = torch.broadcast_shapes(scale.shape, shift.shape if shift is not None else ())
    if x_shape is not None:
        rank = len(x_shape)
        aligned = (1,) * (rank - len(shape)) + tuple(shape)
        if len(shape) > rank or any(a != 1 and a != s for a, s in zip(aligned, x_shape)):
            return None  # the result would not have x's shape
    big = [i for i, n in enumerate(shape) if n != 1]
    if not big:
        return Affine(scale.reshape(()), None if shift is None else shift.reshape(()), None, len(shape))
    if len(big) != 1:
        return None
    trailing = len(shape) - big[0] - 1  # dims after the channel axis, broadcasting from the right
    if x_shape is not None:
        axis = len(x_shape) - 1 - trailing
        if axis not in (1, len(x_shape) - 1):
            return None  # scales an axis that is not the channels
        trailing = len(x_shape) - 2 if axis == 1 else 0
    chans = shape[big[0]]
    scale = scale.reshape(-1).expand(chans).clone()
    if shift is not None:
        shift = shift.reshape(-1).expand(chans).clone()
    return Affine(scale, shift, trailing, len(shape))


def _cut(start, stop, step, size=None) -> int | None:
    """r for a symmetric crop start:stop (r:-r, or r:size-r), 0 for the whole axis, else None."""
    if step not in (None, 1):
        return None
    start = start or 0
    if stop is None or (size is not None and stop >= size) or stop == 9223372036854775807:
        return 0 if start == 0 else None
    if stop < 0 and start == -stop:
        return start
    if size is not None and stop == size - start and start > 0:
        return start
    return None


def _tuple(v, nd):
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == nd else tuple(v) * nd if len(v) == 1 else tuple(v)
    return (v,) * nd


def _padding(padding, kernel, dilation):
    """Symmetric padding per axis; None for 'same' that pads asymmetrically."""
    nd = len(kernel)
    if padding == "valid":
        return (0,) * nd
    if padding == "same":
        ext = [d * (k - 1) for k, d in zip(kernel, _tuple(dilation, nd))]
        return None if any(e % 2 for e in ext) else tuple(e // 2 for e in ext)
    return _tuple(padding, nd)


def make_module(spec: ConvSpec, dtype, device, conv: bool = True) -> nn.Module:
    """An nn.Conv{1,2,3}d (nn.Linear for nd 0) holding `spec`, cast to dtype/device; a
    `ChannelAffine` where `conv` is False (the ops it replaces held no convolution)."""
    if not conv and (diag := algebra.per_channel(spec)) is not None:
        scale, shift = diag
        if not any(spec.padding) and all(t is None or bool((t == t.flatten()[0]).all()) for t in diag):
            # one value for every channel (scalar multiplies and identities): a scalar affine,
            # which holds for any channel count (the count may have been read off another axis)
            scale, shift = (None if t is None else t.flatten()[0] for t in diag)
        cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
        return ChannelAffine(cast(scale), cast(shift), spec.nd, spec.padding)
    if spec.nd == 0:
        w = algebra.dense(spec)
        m = nn.Linear(w.shape[1], w.shape[0], bias=spec.bias is not None, device="meta")
    else:
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spec.nd]
        w = spec.weight
        m = cls(spec.in_channels, spec.out_channels, spec.kernel, spec.stride, spec.padding,
                spec.dilation, spec.groups, bias=spec.bias is not None, device="meta")
    m.weight = nn.Parameter(w.to(dtype=dtype, device=device).contiguous())
    if spec.bias is not None:
        m.bias = nn.Parameter(spec.bias.to(dtype=dtype, device=device).contiguous())
    return m
