"""Random programs written the way other people write PyTorch, for the differential suite.

`programs(features)` draws a small model as Python SOURCE: an `__init__` that builds its layers
and a `forward` that is a random DAG of statements over the input and earlier values, in the
idioms of published block code (see /work/shared/FINDINGS.md): in-place activations and
arithmetic, augmented assignment on aliases, slice writes, copies and views whose source is
later mutated, sizes read from the input, keyword-only functional calls, hooks, an optional
forward argument, unbatched input, broadcasting constants, dtype promotion.

Every statement is checked while drawing by running it eagerly on real tensors of BOTH input
shapes the test will use (and in grad mode): a statement that raises is dropped and another is
drawn, so every program is a valid PyTorch program by construction. What the program computes
is whatever eager PyTorch computes; nothing here predicts values by hand.

Weights, BN statistics and inputs come from `torch.Generator(seed)`, never global randomness.
Nothing in this file imports reparam.
"""
from __future__ import annotations

import itertools
import linecache
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_leaves

# what every generated source file starts with
HEADER = '''\
import torch
import torch.nn.functional as F
from torch import nn


def _count(m, args, out):
    """A forward hook that only records: how many times the module ran."""
    m.calls = getattr(m, "calls", 0) + 1


class ConvBN(nn.Module):
    """conv then BN, with a method its parent may call instead of forward."""

    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return self.bn(self.conv(x))

    def features(self, x):
        return self.bn(self.conv(x)).relu()
'''

# The op families a program may draw from:
#   plain        convs (module / F.conv, any k, stride, padding, dilation, groups, bias), BN (module /
#                F.batch_norm), channels-last Linear, avg pools, activations, eval identities
#                (Identity, Dropout), copies, reshape round trips, per-channel scale/shift, forks of
#                aligned branches (conv, conv-BN, BN, identity, pool, DBB 1x1-BN-pad-kxk) joined by
#                +, -, torch.add, sum([...]), `y = a; y += b` or a channel cat, classifier heads
#   inplace      in-place activations, add_/mul_/sub_/clamp_/copy_, `*=`/`+=`, `y = a; y += b` on
#                aliases, copies and views written after they are taken (the input is never written)
#   writes_input the input written too: first thing in forward or through an alias
#   slices       slice assignment (border strips, channel ranges, DBB's pad-and-fill), index_put_
#   crops        ACNet branches reading spatial crops `x[:, :, r:-r, :]`
#   dynamic      pools sized from the input, interpolation to `x.shape[2:]`
#   keywords     F.conv2d(input=...), F.batch_norm(input=...), F.linear(input=...),
#                F.avg_pool2d(input=...), self.m(input=x)
#   hooks        forward hooks / pre-hooks that change or record outputs
#   containers   the parent iterates or indexes a child Sequential / ModuleList (`for m in self.s`,
#                `self.s[0]`, `range(len(self.s))`) or calls a child's method (`self.c.features(v)`),
#                sometimes under a branch on a size, so that the parent keeps its Python
#   optional     forward(x, scale=None), the argument left at its default
#   unbatched    (C, H, W) inputs to 2-D convs (no BN then)
#   broadcast    constants that broadcast to a higher rank or along a non-channel axis
#   promotion    a float64 buffer times float32 values
#   cat_dims     cats along the batch or a spatial dim (and dim 1 of unbatched values)
FEATURES = ("plain", "inplace", "writes_input", "slices", "crops", "dynamic", "keywords", "hooks", "optional",
            "containers", "unbatched", "broadcast", "promotion", "cat_dims")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


# ---- helpers the tests share (reparam-free) ----

def rel_error(expected, actual) -> float:
    """max|e - a| / max|e| over each tensor leaf (absolute where e is all zeros); inf on a
    structure or shape mismatch."""
    exp = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor)]
    act = [t for t in tree_leaves(actual) if isinstance(t, torch.Tensor)]
    if len(exp) != len(act):
        return math.inf
    worst = 0.0
    for e, a in zip(exp, act):
        if e.shape != a.shape:
            return math.inf
        if e.numel() == 0:
            continue
        e, a = e.detach().double(), a.detach().double()
        err = (e - a).abs().max().item()
        if math.isnan(err):
            return math.inf
        scale = e.abs().max().item()
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def dtypes(out) -> list:
    return [t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def clone_tree(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


@torch.no_grad()
def run(model: nn.Module, args: tuple):
    """(outputs, the arguments' values after the call): the model runs on fresh clones."""
    fresh = clone_tree(args)
    out = model(*fresh)
    out = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in tree_leaves(out))
    return out, fresh


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every floating parameter and buffer from torch.Generator(seed), in its own dtype.

    Conv/Linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.5²); BN mean ~ N(0, 0.5²), var in
    [0.25, 2), weight ~ N(1, 0.5²), bias ~ N(0, 0.5²). Loose tensors by name prefix:
    w_ (a kernel: fan-in), b_ and rm_ (N(0, 0.5²)), rv_ (a variance: [0.25, 2)), any other
    (a scale or value) ~ N(1, 0.5²)."""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * std + mean)

    def positive(t):
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * 1.75 + 0.25)

    done = set()
    for m in model.modules():
        own = [(n, t) for n, t in itertools.chain(m.named_parameters(recurse=False), m.named_buffers(recurse=False))
               if t is not None and t.is_floating_point() and id(t) not in done]
        for name, t in own:
            done.add(id(t))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                {"running_mean": lambda: normal(t, 0.5), "running_var": lambda: positive(t),
                 "weight": lambda: normal(t, 0.5, 1.0), "bias": lambda: normal(t, 0.5)}.get(name, lambda: None)()
            elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and name in ("weight", "bias"):
                normal(t, 1 / math.sqrt(t[0].numel())) if name == "weight" else normal(t, 0.5)
            elif name.startswith("w_"):
                normal(t, 1 / math.sqrt(t[0].numel()))
            elif name.startswith(("b_", "rm_")):
                normal(t, 0.5)
            elif name.startswith("rv_"):
                positive(t)
            else:
                normal(t, 0.5, 1.0)
    return model


def make_input(shape, seed: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


_SOURCES = itertools.count()


def load(source: str, name: str = "Program") -> type:
    """The class `name` defined by `source`, with the source in linecache (tracebacks show it)."""
    filename = f"<foreign-{next(_SOURCES)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict = {}
    exec(compile(source, filename, "exec"), ns)
    return ns[name]


# ---- programs ----

@dataclass
class Program:
    """A generated model: its source, dtype, seed, and the two input shapes it was checked on."""
    source: str
    dtype: torch.dtype
    seed: int
    shapes: tuple[tuple[int, ...], tuple[int, ...]]

    def model(self) -> nn.Module:
        cls = load(self.source)
        return randomize(cls(self.dtype), self.seed).eval()

    def inputs(self, which: int) -> tuple:
        return (make_input(self.shapes[which], self.seed + 1 + which, self.dtype),)

    def __repr__(self):
        return f"Program(dtype={self.dtype}, seed={self.seed}, shapes={self.shapes})\n{self.source}"

    def _repr_pretty_(self, printer, cycle):  # the falsifying example; the tests note the source
        printer.text(f"Program(dtype={self.dtype}, seed={self.seed}, shapes={self.shapes}, "
                     f"source: {self.source.count(chr(10))} lines, see below)")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _tup(v):
    return v[0] if len(set(v)) == 1 else tuple(v)


class _Builder:
    """Draws statements, checks each on both input shapes, and keeps those that run."""

    def __init__(self, draw, features, nd, batched, dtype, shapes):
        self.draw, self.f, self.nd, self.batched, self.dtype = draw, set(features), nd, batched, dtype
        self.rank = nd + (2 if batched else 1)
        self.cd = -(nd + 1)  # the channel dim, from the end
        self.holder = nn.Module().eval()
        self.glob = {"torch": torch, "F": F, "nn": nn, "dtype": dtype}
        exec(compile(HEADER, "<header>", "exec"), self.glob)
        self.envs = [dict(self.glob, self=self.holder, x=make_input(s, 0, dtype), scale=None) for s in shapes]
        self.x0 = [env["x"].clone() for env in self.envs]
        self.x_version = [env["x"]._version for env in self.envs]  # shared by x's views and aliases
        self.init: list[str] = []
        self.body: list[str] = []
        self.vars = ["x"]
        self.ids = itertools.count()
        self.output: str | None = None
        self.conv, self.bn, self.pool = f"nn.Conv{nd}d", f"nn.BatchNorm{nd}d", f"nn.AvgPool{nd}d"
        self.fconv, self.fpool = f"F.conv{nd}d", f"F.avg_pool{nd}d"

    # -- reading the state --
    def has(self, feature):
        return feature in self.f

    def shape(self, v, i=0):
        return tuple(self.envs[i][v].shape)

    def C(self, v):
        return self.shape(v)[self.cd]

    def maps(self, same_dtype=True):
        """Variables shaped like the input (in both envs), of the model's dtype."""
        out = []
        for v in self.vars:
            ts = [e.get(v) for e in self.envs]
            if all(isinstance(t, torch.Tensor) and t.dim() == self.rank for t in ts) \
                    and (not same_dtype or ts[0].dtype == self.dtype):
                out.append(v)
        return out

    def pick(self, options):
        """Mostly the latest variable (a chain), sometimes any earlier one (a DAG)."""
        if not options:
            return None
        if self.draw(st.integers(0, 9)) < 6:
            return options[-1]
        return self.draw(st.sampled_from(options))

    def same_shape(self, a):
        return [v for v in self.maps(same_dtype=False) if v != a
                and all(self.shape(v, i) == self.shape(a, i) for i in range(2))]

    def fresh(self, prefix):
        return f"{prefix}{next(self.ids)}"

    def choice(self, options):
        return self.draw(st.sampled_from(options))

    def chance(self, p):
        return self.draw(st.integers(0, 99)) < p * 100

    def index(self, dim, s):
        """The subscript `[:, :, s, :]` selecting `s` along `dim` (from the end)."""
        parts = [":"] * self.rank
        parts[self.rank + dim] = s
        return "[" + ", ".join(parts) + "]"

    def per_channel_view(self):
        return "(1, -1" + ", 1" * self.nd + ")" if self.batched else "(-1" + ", 1" * self.nd + ")"

    # -- writing --
    def attempt(self, init, body, new=(), touched=()) -> bool:
        """Run `init` on the holder and `body` on both inputs' values; keep them if all runs."""
        try:
            for line in init:
                exec(line, dict(self.glob, self=self.holder))
            self.holder.eval()  # new modules start in training mode; the program runs in eval
            with torch.enable_grad():
                for env in self.envs:
                    exec("\n".join(body), env)
            for env, version in zip(self.envs, self.x_version):
                for v in new:
                    if not isinstance(env.get(v), torch.Tensor) or env[v].numel() == 0:
                        return False
                if not self.has("writes_input") and env["x"]._version != version:
                    self._restore()
                    return False  # the input was written (directly or through an alias or view)
        except Exception:
            self._restore()
            return False
        self.init += init
        self.body += body
        for v in list(touched) + list(new):  # the latest value last: later ops read it most
            if v in self.vars:
                self.vars.remove(v)
            self.vars.append(v)
        return True

    def _restore(self):
        """Undo what a dropped statement wrote into the input (other values only need shapes)."""
        if not self.has("writes_input"):
            for env, x0 in zip(self.envs, self.x0):
                env["x"].copy_(x0)
            self.x_version = [env["x"]._version for env in self.envs]

    def module(self, ctor, init, hookable=True, positional=True):
        """Name of a new submodule built by `ctor` (its init lines appended to `init`), maybe
        with a hook that changes or records what it computes."""
        name = self.fresh("m")
        init.append(f"self.{name} = {ctor}")
        if hookable and self.has("hooks") and self.chance(0.3):
            hooks = ["self.{m}.register_forward_hook(lambda m, args, out: out * 2)",
                     "self.{m}.register_forward_hook(lambda m, args, out: out + 1)",
                     "self.{m}.register_forward_hook(_count)"]
            if positional:
                hooks += ["self.{m}.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))"]
            init.append(self.choice(hooks).format(m=name))
        return name

    def call(self, name, arg):
        """`self.name(arg)`, or with keywords: `self.name(input=arg)`."""
        if self.has("keywords") and self.chance(0.3):
            return f"self.{name}(input={arg})"
        return f"self.{name}({arg})"


# ---- ops: each draws one statement (or a few) and tries it; True if kept ----

def _conv_spec(b, C, cout=None, k=None, stride=None, padding=None, groups=None):
    g = groups or b.choice(sorted(set([1, 1, C] + _divisors(C))))
    if cout is None:
        cout = b.choice([C, 2 * C]) if g == C and C > 1 else g * b.draw(st.integers(1, max(1, 6 // g)))
    kernels = [(1,), (1,), (3,), (3,), (5,), (2,)] if b.nd == 1 else \
        [(1, 1), (1, 1), (3, 3), (3, 3), (5, 5), (1, 3), (3, 1), (2, 2)]
    k = k or b.choice(kernels)
    d = tuple(b.choice([1, 1, 1, 2]) for _ in range(b.nd)) if padding is None else (1,) * b.nd
    s = stride or tuple(b.choice([1, 1, 2]) for _ in range(b.nd))
    if padding is None:
        padding = tuple(dd * (kk - 1) // 2 if b.chance(0.6) else b.draw(st.integers(0, 2)) for kk, dd in zip(k, d))
    return dict(cin=C, cout=cout, k=k, s=s, p=padding, d=d, g=g, bias=b.draw(st.booleans()))


def _conv_ctor(b, spec) -> str:
    """The source of an nn.Conv module holding `spec`."""
    k, s, p, d = (_tup(spec[key]) for key in "kspd")
    return (f"{b.conv}({spec['cin']}, {spec['cout']}, {k}, stride={s}, padding={p}, dilation={d}, "
            f"groups={spec['g']}, bias={spec['bias']}, dtype=dtype)")


def _conv_expr(b, spec, a, init, style=None):
    """An expression convolving `a` as `spec` says: an nn.Conv module (positional or keyword
    call) or F.conv with parameters (positional or keyword arguments)."""
    styles = ["module", "module", "functional"] + (["functional_kw"] if b.has("keywords") else [])
    style = style or b.choice(styles)
    s, p, d = _tup(spec["s"]), _tup(spec["p"]), _tup(spec["d"])
    if style == "module":
        return b.call(b.module(_conv_ctor(b, spec), init), a)
    n = next(b.ids)
    init.append(f"self.w_{n} = nn.Parameter(torch.empty({spec['cout']}, {spec['cin'] // spec['g']}, "
                f"{', '.join(map(str, spec['k']))}, dtype=dtype))")
    bias = "None"
    if spec["bias"]:
        init.append(f"self.b_{n} = nn.Parameter(torch.empty({spec['cout']}, dtype=dtype))")
        bias = f"self.b_{n}"
    if style == "functional":
        return f"{b.fconv}({a}, self.w_{n}, {bias}, {s}, {p}, {d}, {spec['g']})"
    return (f"{b.fconv}(input={a}, weight=self.w_{n}, bias={bias}, stride={s}, padding={p}, "
            f"dilation={d}, groups={spec['g']})")


def _bn_expr(b, c, a, init, affine=None, cls=None):
    eps = b.choice([1e-5, 1e-3, 0.1])
    affine = b.draw(st.booleans()) if affine is None else affine
    styles = ["module", "module", "functional"] + (["functional_kw"] if b.has("keywords") else [])
    style = b.choice(styles)
    if style == "module":
        return b.call(b.module(f"{cls or b.bn}({c}, eps={eps}, affine={affine}, dtype=dtype)", init), a)
    n = next(b.ids)
    init += [f'self.register_buffer("rm_{n}", torch.empty({c}, dtype=dtype))',
             f'self.register_buffer("rv_{n}", torch.empty({c}, dtype=dtype))']
    w = bias = "None"
    if affine:
        init += [f"self.g_{n} = nn.Parameter(torch.empty({c}, dtype=dtype))",
                 f"self.b_{n} = nn.Parameter(torch.empty({c}, dtype=dtype))"]
        w, bias = f"self.g_{n}", f"self.b_{n}"
    if style == "functional":
        return f"F.batch_norm({a}, self.rm_{n}, self.rv_{n}, {w}, {bias}, self.training, 0.1, {eps})"
    return (f"F.batch_norm(input={a}, running_mean=self.rm_{n}, running_var=self.rv_{n}, weight={w}, "
            f"bias={bias}, training=False, eps={eps})")


def _act_expr(b, a, init):
    """A non-in-place activation of `a`."""
    style = b.choice(["F.relu", "torch.relu", "module", "sigmoid", "hardswish", "method", "leaky"])
    if style == "module":
        return b.call(b.module(b.choice(["nn.ReLU()", "nn.Hardswish()", "nn.SiLU()"]), init), a)
    return {"F.relu": f"F.relu({a})", "torch.relu": f"torch.relu({a})", "sigmoid": f"torch.sigmoid({a})",
            "hardswish": f"F.hardswish({a})", "method": f"{a}.relu()", "leaky": f"F.leaky_relu({a}, 0.1)"}[style]


def _inplace_act(b, a, init, v):
    """(line, new variable or None): an in-place activation of `a`, its result maybe bound to v."""
    style = b.choice(["module", "F.relu", "F.relu-bare", "hardswish", "relu_", "torch.relu_",
                      "clamp_", "clamp_min", "relu6"])
    if style == "module":
        m = b.module(b.choice(["nn.ReLU(inplace=True)", "nn.Hardswish(inplace=True)", "nn.ReLU6(inplace=True)"]),
                     init)
        return f"{v} = {b.call(m, a)}", v
    return {"F.relu": (f"{v} = F.relu({a}, inplace=True)", v), "F.relu-bare": (f"F.relu({a}, inplace=True)", None),
            "hardswish": (f"{v} = F.hardswish({a}, inplace=True)", v), "relu_": (f"{a}.relu_()", None),
            "torch.relu_": (f"torch.relu_({a})", None), "clamp_": (f"{v} = {a}.clamp_(-0.5, 1.0)", v),
            "clamp_min": (f"{a}.clamp_(min=0.0)", None),
            "relu6": (f"{v} = F.relu6({a}, inplace=True)", v)}[style]


def op_conv(b):
    """conv [→ BN] [→ activation], in any call style."""
    a = b.pick(b.maps())
    if a is None:
        return False
    spec = _conv_spec(b, b.C(a))
    init, v = [], b.fresh("v")
    expr = _conv_expr(b, spec, a, init)
    body = []
    if b.batched and b.chance(0.6):
        if b.chance(0.3):  # an nn.Sequential(conv, BN), as many repos write conv_bn
            init.clear()
            name = b.module(f"nn.Sequential({_conv_ctor(b, spec)}, {b.bn}({spec['cout']}, dtype=dtype))", init)
            expr = b.call(name, a)
        else:
            expr = _bn_expr(b, spec["cout"], expr, init)
    body.append(f"{v} = {expr}")
    if b.chance(0.5):
        if b.has("inplace") and b.chance(0.6):
            line, _ = _inplace_act(b, v, init, v)
            body.append(line)
        else:
            body.append(f"{v} = {_act_expr(b, v, init)}")
    return b.attempt(init, body, [v])


def op_bn(b):
    a = b.pick(b.maps())
    if a is None or not b.batched:
        return False
    init, v = [], b.fresh("v")
    return b.attempt(init, [f"{v} = {_bn_expr(b, b.C(a), a, init)}"], [v])


def op_linear(b):
    """A Linear over channels: channels-last (permute/movedim), Linear, back."""
    a = b.pick(b.maps())
    if a is None:
        return False
    c, out = b.C(a), b.draw(st.integers(1, 6))
    init, v = [], b.fresh("v")
    if b.batched and b.nd == 2 and b.chance(0.5):
        there, back = ".permute(0, 2, 3, 1)", ".permute(0, 3, 1, 2)"
    else:
        there, back = f".movedim({b.cd}, -1)", f".movedim(-1, {b.cd})"
    bias = b.draw(st.booleans())
    if b.has("keywords") and b.chance(0.4):
        n = next(b.ids)
        init.append(f"self.w_{n} = nn.Parameter(torch.empty({out}, {c}, dtype=dtype))")
        extra = ""
        if bias:
            init.append(f"self.b_{n} = nn.Parameter(torch.empty({out}, dtype=dtype))")
            extra = f", bias=self.b_{n}"
        expr = f"F.linear(input={a}{there}, weight=self.w_{n}{extra}){back}"
    else:
        m = b.module(f"nn.Linear({c}, {out}, bias={bias}, dtype=dtype)", init)
        expr = f"{b.call(m, a + there)}{back}"
    return b.attempt(init, [f"{v} = {expr}"], [v])


def op_pool(b):
    a = b.pick(b.maps())
    if a is None:
        return False
    k = b.choice([1, 2, 3, 3])
    s = b.choice([1, 1, 2, k])
    p = b.draw(st.integers(0, k // 2))
    cip = b.draw(st.booleans())
    init, v = [], b.fresh("v")
    style = b.choice(["module", "functional"] + (["functional_kw"] if b.has("keywords") else []))
    if style == "module":
        expr = b.call(b.module(f"{b.pool}({k}, {s}, {p}, count_include_pad={cip})", init), a)
    elif style == "functional":
        expr = f"{b.fpool}({a}, {k}, {s}, {p}, False, {cip})"
    else:
        expr = f"{b.fpool}(input={a}, kernel_size={k}, stride={s}, padding={p}, count_include_pad={cip})"
    return b.attempt(init, [f"{v} = {expr}"], [v])


def op_act(b):
    a = b.pick(b.maps(same_dtype=False))
    if a is None:
        return False
    init, v = [], b.fresh("v")
    if b.has("inplace") and b.chance(0.7):
        line, new = _inplace_act(b, a, init, v)
        return b.attempt(init, [line], [new] if new else [], touched=[a])
    return b.attempt(init, [f"{v} = {_act_expr(b, a, init)}"], [v])


def op_identity(b):
    """What eval mode makes the identity: Identity, Dropout (which returns its input itself)."""
    a = b.pick(b.maps(same_dtype=False))
    if a is None:
        return False
    init, v = [], b.fresh("v")
    options = ["nn.Identity()", "nn.Dropout(0.5)"] + ([f"nn.Dropout{b.nd}d(0.3)"] if b.batched else [])
    if b.has("inplace"):
        options.append("nn.Dropout(0.2, inplace=True)")
    if b.chance(0.3):
        expr = f"F.dropout({a}, 0.2, training=self.training)"
    else:
        expr = b.call(b.module(b.choice(options), init, hookable=False), a)
    return b.attempt(init, [f"{v} = {expr}"], [v])


def op_copy(b):
    """A copy (clone, + 0, * 1, cat of one, contiguous); with in-place ops, then the source or
    the copy is written in place."""
    a = b.pick(b.maps(same_dtype=False))
    if a is None:
        return False
    v = b.fresh("v")
    expr = b.choice([f"{a}.clone()", f"{a} + 0", f"{a} * 1", f"torch.cat([{a}])", f"{a}.contiguous()",
                     f"torch.cat([{a}], dim=1)"])
    body = [f"{v} = {expr}"]
    if b.has("inplace") and b.chance(0.8):
        target = b.choice([a, v])
        body.append(b.choice([f"{target}.mul_(2.0)", f"{target}.add_(0.5)", f"{target}.relu_()",
                              f"{target}.sub_(1.0)", f"{target}.clamp_(-0.3, 0.3)"]))
    return b.attempt([], body, [v], touched=[a])


def op_roundtrip(b):
    """A reshape/view round trip (flatten, then reshape_as / view_as the original), with
    in-place ops a write to either end in between."""
    a = b.pick(b.maps(same_dtype=False))
    if a is None:
        return False
    t, v = b.fresh("t"), b.fresh("v")
    first = b.choice([f"{a}.flatten({-b.nd if b.nd > 1 else -2})", f"{a}.reshape({a}.shape[0], -1)",
                      f"{a}.view({a}.size(0), -1)"])
    body = [f"{t} = {first}"]
    if b.has("inplace") and b.chance(0.8):
        target = b.choice([a, t])
        body.append(b.choice([f"{target}.mul_(3.0)", f"{target}.relu_()", f"{target}.add_(-0.25)"]))
    body.append(f"{v} = {t}.{b.choice(['reshape_as', 'view_as'])}({a})")
    return b.attempt([], body, [v], touched=[a])


def op_scale(b):
    """y * c, c * y, y + c, y / 3, -y, with c a constant or a per-channel parameter/buffer;
    with in-place ops also y.mul_(c), y.add_(p), y *= p, y.sub_(c)."""
    a = b.pick(b.maps(same_dtype=False))
    if a is None:
        return False
    c = b.C(a)
    init, v = [], b.fresh("v")
    n = next(b.ids)
    shape = b.choice([(1, c) + (1,) * b.nd, (c,) + (1,) * b.nd] if b.batched else [(c,) + (1,) * b.nd])
    kind = b.choice(["param", "buffer", "const"])
    if kind == "param":
        init.append(f"self.p_{n} = nn.Parameter(torch.empty({shape}, dtype=dtype))")
        const = f"self.p_{n}"
    elif kind == "buffer":
        init.append(f'self.register_buffer("s_{n}", torch.empty({shape}, dtype=dtype))')
        const = f"self.s_{n}"
    else:
        const = b.choice(["0.7", "1.5", "-0.3"])
    if b.has("inplace") and b.chance(0.5):
        line = b.choice([f"{a}.mul_({const})", f"{a}.add_({const})", f"{a}.sub_({const})",
                         f"{a} *= {const}", f"{a} += {const}", f"torch.mul({a}, {const}, out={a})"])
        return b.attempt(init, [line], touched=[a])
    expr = b.choice([f"{a} * {const}", f"{const} * {a}", f"{a} + {const}", f"{a} - {const}",
                     f"torch.mul({a}, {const})", f"{a}.mul({const})", f"{a} / 3", f"-{a}"])
    return b.attempt(init, [f"{v} = {expr}"], [v])


def op_broadcast(b):
    """A constant that is NOT per channel: one per sample (N, 1, 1, 1), one that broadcasts the
    value to a higher rank ((1, 1, 1, 1, 1), (2, 1, 1, 1, 1), and (1, C, 1, 1) on an unbatched
    (C, H, W) value), or one along the last (spatial) axis where its size is fixed."""
    a = b.pick(b.maps(same_dtype=False))
    if a is None:
        return False
    sh = b.shape(a)
    options = [(1,) * (b.rank + 1), (2,) + (1,) * b.rank]
    if b.batched:
        options.append((sh[0],) + (1,) * (b.rank - 1))
    else:
        options.append((1, sh[0]) + (1,) * b.nd)
    if b.shape(a, 0)[-1] == b.shape(a, 1)[-1]:
        options.append((1,) * (b.rank - 1) + (sh[-1],))
    shape = b.choice(options)
    n = next(b.ids)
    init = [f"self.p_{n} = nn.Parameter(torch.empty({shape}, dtype=dtype))"]
    v = b.fresh("v")
    expr = b.choice([f"{a} * self.p_{n}", f"self.p_{n} * {a}", f"{a} + self.p_{n}"])
    body = [f"{v} = {expr}"]
    if len(shape) > b.rank and b.chance(0.5):  # back to the input's rank
        body.append(f"{v} = {v}.{b.choice(['sum(0)', 'mean(0)', 'squeeze(0)'])}")
    return b.attempt(init, body, [v])


def op_promote(b):
    """A float64 buffer times a value of the model's dtype (float32 → float64 result)."""
    a = b.pick(b.maps())
    if a is None:
        return False
    c = b.C(a)
    n = next(b.ids)
    shape = (1, c) + (1,) * b.nd if b.batched else (c,) + (1,) * b.nd
    init = [f'self.register_buffer("d_{n}", torch.empty({shape}, dtype=torch.float64))']
    v = b.fresh("v")
    return b.attempt(init, [f"{v} = {a} * self.d_{n}"], [v])


def op_binary(b):
    """Two values of one shape: +, -, torch.add, sum([...]), *; with in-place ops a.add_(b),
    `y = a; y += b` (writes a), a.copy_(b); with cat_dims a cat along a non-channel dim."""
    a = b.pick(b.maps(same_dtype=False))
    if a is None:
        return False
    others = b.same_shape(a)
    if not others:
        return False
    o = b.choice(others)
    v = b.fresh("v")
    styles = ["plus", "sub", "torch.add", "sum", "mul"] + (["cat"] if b.has("cat_dims") else []) \
        + (["add_", "alias_iadd", "copy_", "copy_fresh"] if b.has("inplace") else [])
    style = b.choice(styles)
    if style == "cat":
        dims = [0, -1] + ([2] if b.rank > 2 else []) + ([1] if not b.batched else [])
        return b.attempt([], [f"{v} = torch.cat([{a}, {o}], dim={b.choice(dims)})"], [v])
    lines = {"plus": [f"{v} = {a} + {o}"], "sub": [f"{v} = {a} - {o}"], "torch.add": [f"{v} = torch.add({a}, {o})"],
             "sum": [f"{v} = sum([{a}, {o}])"], "mul": [f"{v} = {a} * {o}"],
             "add_": [f"{v} = {a}.add_({o})"], "alias_iadd": [f"{v} = {a}", f"{v} += {o}"],
             "copy_": [f"{a}.copy_({o})"], "copy_fresh": [f"{v} = torch.empty_like({a})", f"{v}.copy_({o})"]}[style]
    new = [] if style == "copy_" else [v]
    return b.attempt([], lines, new, touched=[a])


def _branch(b, kind, a, C, cout, stride, init, t):
    """Lines binding t to one branch of a fork on a: (kind, C → cout, stride)."""
    s = (stride,) * b.nd
    if kind in ("conv", "conv_bn"):
        g = b.choice(_divisors(math.gcd(C, cout)))
        k = b.choice([(1,), (3,), (5,)] if b.nd == 1 else [(1, 1), (3, 3), (5, 5), (1, 3), (3, 1)])
        spec = dict(cin=C, cout=cout, k=k, s=s, p=tuple(kk // 2 for kk in k), d=(1,) * b.nd, g=g,
                    bias=b.draw(st.booleans()))
        expr = _conv_expr(b, spec, a, init)
        if kind == "conv_bn":
            expr = _bn_expr(b, cout, expr, init)
        return [f"{t} = {expr}"]
    if kind == "bn":
        return [f"{t} = {_bn_expr(b, C, a, init)}"]
    if kind == "id":
        bare = b.draw(st.booleans())
        return [f"{t} = " + (a if bare else b.call(b.module("nn.Identity()", init, hookable=False), a))]
    if kind == "pool":
        if b.draw(st.booleans()):
            expr = b.call(b.module(f"{b.pool}(3, {stride}, 1)", init), a)
        else:
            expr = f"{b.fpool}({a}, 3, {stride}, 1)"
        if b.batched and b.chance(0.5):
            expr = _bn_expr(b, C, expr, init)
        return [f"{t} = {expr}"]
    # dbb: 1×1 conv → BN → pad with the BN's value of a zero input → unpadded k×k conv [→ BN]
    k = b.choice([3, 3, 5])
    p = k // 2
    g1 = b.choice(_divisors(C))
    mid = g1 * b.draw(st.integers(1, 2))
    first = b.module(f"{b.conv}({C}, {mid}, 1, groups={g1}, bias=False, dtype=dtype)", init)
    bn = b.module(f"{b.bn}({mid}, eps={b.choice([1e-5, 0.1])}, dtype=dtype)", init, hookable=False)
    g2 = b.choice(_divisors(math.gcd(mid, cout)))
    second = b.module(f"{b.conv}({mid}, {cout}, {k}, stride={stride}, groups={g2}, "
                      f"bias={b.draw(st.booleans())}, dtype=dtype)", init)
    value = f"self.{bn}.bias - self.{bn}.running_mean * self.{bn}.weight / torch.sqrt(self.{bn}.running_var + self.{bn}.eps)"
    lines = [f"{t} = self.{bn}(self.{first}({a}))", f"{t}_pad = ({value}).view{b.per_channel_view()}"]
    if b.has("slices"):
        lines.append(f"{t} = F.pad({t}, [{p}] * {2 * b.nd})")
        for dim in range(-b.nd, 0):
            lines += [f"{t}{b.index(dim, f'0:{p}')} = {t}_pad", f"{t}{b.index(dim, f'-{p}:')} = {t}_pad"]
    else:
        lines.append(f"{t} = F.pad({t} - {t}_pad, [{p}] * {2 * b.nd}) + {t}_pad")
    lines.append(f"{t} = self.{second}({t})")
    return lines


def op_fork(b):
    """Branches of one value (conv, conv-BN, BN, identity, avg pool, DBB's 1×1 → BN-and-pad →
    k×k), aligned, joined by a sum (in a drawn style) or a cat along channels, then maybe an
    activation (in place with in-place ops)."""
    a = b.pick(b.maps())
    if a is None:
        return False
    C = b.C(a)
    join = b.choice(["sum", "sum", "sum", "cat"])
    stride = b.choice([1, 1, 2])
    cout = C if b.chance(0.6) else b.draw(st.integers(1, 6))
    kinds = ["conv", "conv_bn"] if b.batched else ["conv"]
    if cout == C:
        kinds += ["pool"] + (["bn", "id"] if stride == 1 and b.batched else ["id"] if stride == 1 else [])
    if b.batched and b.nd == 2:
        kinds += ["dbb"]
    n = b.draw(st.integers(2, 3))
    same_width = b.draw(st.booleans())  # a cat of equal widths is also valid along other dims
    init, body, terms = [], [], []
    for i in range(n):
        kind = b.choice(kinds)
        t = b.fresh("t")
        width = cout if join == "sum" or same_width else b.draw(st.integers(1, 4))
        if kind in ("bn", "id", "pool"):
            width = C
        body += _branch(b, kind, a, C, width, stride, init, t)
        terms.append((kind, t))
    v = b.fresh("v")
    names = [t for _, t in terms]
    if join == "cat":
        dim = b.choice([1, -(b.nd + 1)])
        body.append(f"{v} = torch.cat([{', '.join(names)}], dim={dim})")
    else:
        style = b.choice(["plus", "torch.add", "sum", "sub", "iadd"] + (["add_"] if b.has("inplace") else []))
        if style in ("iadd", "add_") and not b.has("inplace"):
            # the first term must be a fresh tensor, else `y += t` writes the fork's input
            fresh = [t for kind, t in terms if kind not in ("id", "bn")]
            names = fresh[:1] + [t for t in names if t not in fresh[:1]]
            if not fresh:
                style = "plus"
        if style == "plus":
            body.append(f"{v} = {' + '.join(names)}")
        elif style == "sub":
            body.append(f"{v} = {' - '.join(names)}")
        elif style == "sum":
            body.append(f"{v} = sum([{', '.join(names)}])")
        elif style == "torch.add":
            expr = names[0]
            for t in names[1:]:
                expr = f"torch.add({expr}, {t})"
            body.append(f"{v} = {expr}")
        elif style == "iadd":  # `out = a; out += b`: writes `a` (the fork's input where a is x)
            body.append(f"{v} = {names[0]}")
            body += [f"{v} += {t}" for t in names[1:]]
        else:
            body.append(f"{v} = {names[0]}.add_({names[1]})" + "".join(f".add_({t})" for t in names[2:]))
    if b.chance(0.5):
        if b.has("inplace") and b.chance(0.7):
            body.append(_inplace_act(b, v, init, v)[0])
        else:
            body.append(f"{v} = {_act_expr(b, v, init)}")
    return b.attempt(init, body, [v], touched=[a])


def op_crops(b):
    """ACNet with crops: a k×k conv with padding p < k//2, plus 1×k and k×1 convs reading the
    value cropped by r = k//2 - p rows / columns (`x[:, :, r:-r, :]`), summed."""
    a = b.pick(b.maps())
    if a is None or b.nd != 2:
        return False
    C = b.C(a)
    k = b.choice([3, 3, 5])
    p = b.draw(st.integers(0, k // 2 - 1))
    r = k // 2 - p
    cout = b.draw(st.integers(1, 6))
    init = []
    bias = b.draw(st.booleans())
    sq = b.module(f"nn.Conv2d({C}, {cout}, {k}, padding={p}, bias={bias}, dtype=dtype)", init)
    hor = b.module(f"nn.Conv2d({C}, {cout}, (1, {k}), padding=(0, {p}), bias={bias}, dtype=dtype)", init)
    ver = b.module(f"nn.Conv2d({C}, {cout}, ({k}, 1), padding=({p}, 0), bias={bias}, dtype=dtype)", init)
    rows, cols = b.index(-2, f"{r}:-{r}"), b.index(-1, f"{r}:-{r}")
    terms = [f"self.{sq}({a})", f"self.{hor}({a}{rows})", f"self.{ver}({a}{cols})"]
    if b.batched and b.chance(0.5):
        terms = [_bn_expr(b, cout, t, init) for t in terms]
    v = b.fresh("v")
    return b.attempt(init, [f"{v} = {' + '.join(terms)}"], [v])


def op_slices(b):
    """Writes by subscript: a border strip set to a constant or a per-channel value, the first
    channels overwritten from another value, index_put_, or DBB's pad-then-fill-the-border."""
    a = b.pick(b.maps(same_dtype=False))
    if a is None:
        return False
    c = b.C(a)
    style = b.choice(["strip", "channels", "index_put_", "pad_fill", "pad_fill"])
    init, body, new = [], [], []
    n = next(b.ids)
    value = b.choice(["0.0", "1.5", "per-channel"])
    if value == "per-channel":
        init.append(f"self.pv_{n} = nn.Parameter(torch.empty({c}, dtype=dtype))")
        value = f"self.pv_{n}.view{b.per_channel_view()}"
    if style == "strip":
        dim = b.draw(st.integers(-b.nd, -1))
        p = b.draw(st.integers(1, 2))
        body.append(f"{a}{b.index(dim, b.choice([f'0:{p}', f'-{p}:']))} = {value}")
    elif style == "channels":
        others = [o for o in b.maps(same_dtype=False) if b.C(o) >= 2 and o != a]
        if c < 2 or not others:
            return False
        o = b.choice(others)
        sl = "[:, :2]" if b.batched else "[:2]"
        body.append(f"{a}{sl} = {o}{sl}")
    elif style == "index_put_":
        idx = f"(torch.tensor([0]), torch.tensor([{c - 1}]))" if b.batched else f"(torch.tensor([{c - 1}]),)"
        body.append(f"{a}.index_put_({idx}, torch.tensor(0.5, dtype={b.envs[0][a].dtype}))")
    else:
        v = b.fresh("v")
        p = b.draw(st.integers(1, 2))
        body.append(f"{v} = F.pad({a}, [{p}] * {2 * b.nd})")
        for dim in range(-b.nd, 0):
            body += [f"{v}{b.index(dim, f'0:{p}')} = {value}", f"{v}{b.index(dim, f'-{p}:')} = {value}"]
        new = [v]
        return b.attempt(init, body, new)
    return b.attempt(init, body, touched=[a])


def op_dynamic(b):
    """Sizes read from the input: a squeeze-excite gate pooled with `kernel_size=x.size(3)` or
    `[h, w]` from `x.size()`; an interpolation to `x.shape[2:]` of a smaller value."""
    a = b.pick(b.maps())
    if a is None:
        return False
    c = b.C(a)
    init, v = [], b.fresh("v")
    if b.chance(0.7):
        s = b.fresh("s")
        spatial = "2:" if b.batched else "1:"
        last = b.rank - 1
        pools = [[f"{s} = {b.fpool}({a}, kernel_size={a}.size({last}))"],
                 [f"{s} = F.adaptive_avg_pool{b.nd}d({a}, 1)"]]
        if b.nd == 2:
            pools.append([f"h, w = {a}.size()[{spatial}]", f"{s} = F.avg_pool2d({a}, [h, w])"])
        else:
            pools.append([f"length = {a}.size()[{spatial}][0]", f"{s} = F.avg_pool1d({a}, length)"])
        body = list(b.choice(pools))
        mid = max(1, c // 2)
        fc1 = b.module(f"{b.conv}({c}, {mid}, 1, dtype=dtype)", init)
        fc2 = b.module(f"{b.conv}({mid}, {c}, 1, dtype=dtype)", init)
        body.append(f"{s} = torch.sigmoid(self.{fc2}(F.relu(self.{fc1}({s}))))")
        body.append(f"{v} = {a} * {s}")
        return b.attempt(init, body, [v])
    if not b.batched:
        return False
    smaller = [o for o in b.maps() if o != a and all(
        all(x <= y for x, y in zip(b.shape(o, i)[2:], b.shape(a, i)[2:])) for i in range(2))]
    if not smaller:
        return False
    o = b.choice(smaller)
    mode = b.choice(["nearest", "bilinear" if b.nd == 2 else "linear"])
    corners = ", align_corners=False" if mode != "nearest" else ""
    expr = f"F.interpolate({o}, size={a}.shape[2:], mode={mode!r}{corners})"
    if b.C(o) == c and b.chance(0.7):
        expr = f"{a} + {expr}"
    return b.attempt(init, [f"{v} = {expr}"], [v])


def op_head(b):
    """The classifier head: global pool, flatten, Linear [→ BatchNorm1d]; the model's output."""
    a = b.pick(b.maps())
    if a is None:
        return False
    c = b.C(a)
    out = b.draw(st.integers(1, 5))
    init, v = [], b.fresh("v")
    dims = tuple(range(-b.nd, 0))
    pooled = b.choice([f"torch.flatten(F.adaptive_avg_pool{b.nd}d({a}, 1), {1 if b.batched else 0})",
                       f"{a}.mean({dims})"])
    body = [f"{v} = {b.call(b.module(f'nn.Linear({c}, {out}, dtype=dtype)', init), pooled)}"]
    if b.batched and b.chance(0.5):
        body.append(f"{v} = {_bn_expr(b, out, v, init, cls='nn.BatchNorm1d')}")
    if b.attempt(init, body, [v]):
        b.output = v
        return True
    return False


def op_container(b):
    """conv-BN(-activation) layers in a child container the parent iterates or indexes, or a
    child whose method the parent calls; sometimes under `if v.size(-1) > 0:` (always true, but
    symbolic tracing cannot branch on it: the parent keeps its Python and calls fused children)."""
    a = b.pick(b.maps())
    if a is None or not b.batched:
        return False
    spec = _conv_spec(b, b.C(a))
    conv = _conv_ctor(b, spec)
    bn = f"{b.bn}({spec['cout']}, dtype=dtype)"
    layers = [conv, bn] + (["nn.ReLU()"] if b.chance(0.5) else [])
    style = b.choice(["iterate", "index", "len", "modulelist", "method"])
    init, v = [], b.fresh("v")
    if style == "method":
        name = b.module(f"ConvBN({conv}, {bn})", init, hookable=False)
        body = [f"{v} = self.{name}.{b.choice(['features', 'forward'])}({a})"]
    else:
        ctor = f"nn.ModuleList([{', '.join(layers)}])" if style == "modulelist" else f"nn.Sequential({', '.join(layers)})"
        name = b.module(ctor, init, hookable=False)
        loop = [f"{v} = {a}", f"for m in self.{name}:", f"    {v} = m({v})"]
        body = {"iterate": loop, "modulelist": loop,
                "index": [f"{v} = self.{name}[1](self.{name}[0]({a}))"]
                + ([f"{v} = self.{name}[-1]({v})"] if len(layers) > 2 else []),
                "len": [f"{v} = {a}", f"for i in range(len(self.{name})):", f"    {v} = self.{name}[i]({v})"]}[style]
    if b.chance(0.5):
        body = [f"{v} = {a}", f"if {a}.size(-1) > 0:"] + [f"    {line}" for line in body]
    return b.attempt(init, body, [v])


OPS = {  # op → the feature it belongs to
    op_conv: "plain", op_bn: "plain", op_linear: "plain", op_pool: "plain",
    op_act: "plain", op_identity: "plain", op_copy: "plain", op_roundtrip: "plain", op_scale: "plain",
    op_fork: "plain", op_binary: "plain", op_head: "plain", op_broadcast: "broadcast",
    op_promote: "promotion", op_crops: "crops", op_slices: "slices", op_dynamic: "dynamic",
    op_container: "containers",
}
# drawn more often: what builds the re-parameterizable structure
WEIGHT = {op_conv: 3, op_fork: 3, op_bn: 1, op_act: 2, op_head: 1, op_broadcast: 2, op_slices: 2, op_dynamic: 2,
          op_container: 3}


def _mutate_input(b):
    line = b.choice(["x.sub_(0.5)", "x.mul_(2.0)", "x.relu_()", "x.clamp_(-1.0, 1.0)", "x += 1.0"])
    b.attempt([], [line], touched=["x"])


@st.composite
def programs(draw, features=FEATURES, max_ops=10):
    """A Program using the op families in `features` (see FEATURES), checked on two inputs of
    different spatial sizes."""
    features = set(features)
    modes = [(2, True), (2, True), (1, True)] + ([(2, False)] * 3 if "unbatched" in features else [])
    nd, batched = draw(st.sampled_from(modes))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    c = draw(st.integers(1, 6))
    sizes_a = [draw(st.integers(3, 9)) for _ in range(nd)]
    if nd == 2 and draw(st.booleans()):
        sizes_a[1] = sizes_a[0]  # square, as squeeze-excite blocks assume
    grow = draw(st.integers(1, 4))
    keep_last = draw(st.booleans())
    sizes_b = [s + grow for s in sizes_a]
    if keep_last and nd == 2:
        sizes_b[1] = sizes_a[1]
    lead = (2, c) if batched else (c,)
    shapes = ((*lead, *sizes_a), (*lead, *sizes_b))
    b = _Builder(draw, features, nd, batched, dtype, shapes)
    if "writes_input" in features and draw(st.booleans()):
        _mutate_input(b)
    ops = [op for op, f in OPS.items() if f in features]
    weighted = [op for op in ops for _ in range(WEIGHT.get(op, 1))]
    optional_at = draw(st.integers(0, max_ops)) if "optional" in features else None
    for i in range(draw(st.integers(2, max_ops))):
        if b.output is not None:
            break
        op = draw(st.sampled_from(weighted))
        op(b)
        if i == optional_at and b.vars[-1] != "x":
            v = b.vars[-1]
            b.body += ["if scale is not None:", f"    {v} = {v} * scale"]
    assume(len(b.body) > 0 and b.init)
    # the output: the head, or the latest value, sometimes with an earlier one
    out = b.output or b.vars[-1]
    if b.output is None and len(b.vars) > 1 and draw(st.integers(0, 3)) == 0:
        out = f"{out}, {draw(st.sampled_from(b.vars[:-1]))}"
    args = "x, scale=None" if "optional" in features else "x"
    source = HEADER + "\n\nclass Program(nn.Module):\n    def __init__(self, dtype=torch.float32):\n" \
        + "        super().__init__()\n" + "".join(f"        {line}\n" for line in b.init) \
        + f"\n    def forward(self, {args}):\n" + "".join(f"        {line}\n" for line in b.body) \
        + f"        return {out}\n"
    program = Program(source, dtype, draw(st.integers(0, 2**32 - 1)), shapes)
    assume(_valid(program))
    return program


def _valid(program: Program) -> bool:
    """The program runs eagerly (grad mode and no_grad) on both inputs, its outputs are finite
    and non-empty, and two runs give the same outputs (nothing random)."""
    try:
        model = program.model()
        for which in range(2):
            args = program.inputs(which)
            with torch.enable_grad():
                model(*clone_tree(args))
            first, _ = run(model, args)
            second, _ = run(model, args)
            leaves = [t for t in first if isinstance(t, torch.Tensor)]
            if not leaves or not all(t.numel() and torch.isfinite(t).all() for t in leaves):
                return False
            if rel_error(first, second) != 0:
                return False
        return True
    except Exception:
        return False
