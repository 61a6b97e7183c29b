"""Mutation is data flow: in-place writes of every kind fuse to the same function (issue 10,
item 1), with and without example inputs, and the inputs are written as the model writes them."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import reparam
from reparam import mutation, trace

from strategies import randomize


def conv_bn(cin=3, cout=3, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class Idiom(nn.Module):
    """conv-BN branches around one in-place idiom (`self.how`), in the spellings of other code."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = conv_bn(), conv_bn(3, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        self.ident = nn.Identity()

    def forward(self, x):
        how = self.how
        if how == "conv-then-input-relu_":  # a new conv must read x before the write
            y = self.a(x)
            x.relu_()
            return y + x
        if how == "relu-module-inplace":  # nn.ReLU(inplace=True) rectifies the branch tensor itself
            s = self.a(x)
            self.relu(s)
            return s + self.b(x)
        if how == "F.relu-inplace":
            s = self.a(x)
            F.relu(s, inplace=True)
            return s + self.b(x)
        if how == "hardswish-inplace":
            s = self.a(x)
            F.hardswish(s, inplace=True)
            return s + self.b(x)
        if how == "alias-iadd":  # y = x; y += t: fx alone records a plain add, x stays unwritten
            y = self.a(x)
            z = y
            z += self.b(x)
            return y
        if how == "add_-clamp_":
            y = self.a(x)
            y.add_(self.b(x)).clamp_(-0.5, 0.5)
            return y
        if how == "clone-then-source-written":  # the copy must stay
            y = x.clone()
            x.mul_(2)
            return self.a(y) + self.b(x)
        if how == "clone-written":
            y = x.clone()
            y.mul_(3)
            return self.a(y) + self.b(x)
        if how == "plus-zero-written":
            y = x + 0
            y.sub_(1)
            return self.a(x) + y
        if how == "cat-one-written":
            y = torch.cat([x])
            y.relu_()
            return self.a(x) + y
        if how == "contiguous-written":
            y = x.contiguous()  # the input itself: the write reaches x
            y.mul_(0.5)
            return self.a(x) + self.b(x)
        if how == "contiguous-written-after-the-last-read":  # the caller still sees x afterwards
            s = self.a(x) + self.b(x)
            y = x.contiguous()
            y.mul_(0.5)
            return s
        if how == "reshape_as-round-trip-written":
            f = self.a(x)
            z = f.flatten(1).reshape_as(f)
            f.mul_(2)  # z may share f's storage: refused by symbolic tracing, exported with inputs
            return z + self.b(x)
        if how == "view-written":
            y = self.a(x)
            v = y.view(y.shape[0], -1)
            v.mul_(-1)
            return y + self.b(x)
        if how == "view-taken-between-writes":  # the view reads the base's value after the second write
            y = self.relu(self.a(x) + self.b(x))
            v = y.view(y.shape[0], -1)
            y.add_(-0.25)
            return v.reshape_as(y)
        if how == "keyword-alias-written":  # nn.Identity()(input=x) is x itself: the write reaches x
            y = self.ident(input=x)
            y.mul_(2)
            return self.a(x) + self.b(x)
        if how == "out=-written-view-read-later":  # torch.mul(..., out=y) writes y and its views
            y = self.relu(self.a(x) + self.b(x))
            t = y.view(y.size(0), -1)
            t.mul_(3.0)
            v = t.view_as(y)
            torch.mul(y, -0.3, out=y)
            return v + 1
        if how == "slice-assign":
            y = self.a(x)
            y[:, :1] = self.b(x)[:, :1]
            return y
        if how == "index_put_":
            y = self.a(x)
            idx = torch.tensor([0, 2])
            y.index_put_((torch.arange(1), idx), torch.tensor(0.5))
            return y + self.b(x)
        if how == "copy_":
            y = self.a(x)
            y.copy_(self.b(x))
            return y * 2
        if how == "writes-its-input":
            x.sub_(0.5)
            return self.a(x)
        raise ValueError(how)


IDIOMS = ["conv-then-input-relu_", "relu-module-inplace", "F.relu-inplace", "hardswish-inplace", "alias-iadd",
          "add_-clamp_", "clone-then-source-written", "clone-written", "plus-zero-written", "cat-one-written",
          "contiguous-written", "contiguous-written-after-the-last-read", "reshape_as-round-trip-written", "view-written", "view-taken-between-writes", "keyword-alias-written", "out=-written-view-read-later", "slice-assign", "index_put_",
          "copy_", "writes-its-input"]


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-inputs", "inputs"])
@pytest.mark.parametrize("how", IDIOMS)
def test_in_place_idioms_fuse_to_the_same_function(how, with_inputs):
    model = randomize(Idiom(how), 0).eval()
    x = torch.randn(2, 3, 7, 9)
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    for shape in [(2, 3, 7, 9), (1, 3, 11, 5)]:
        a = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        b = a.clone()
        with torch.no_grad():
            want, got = model(a), fused(b)
        assert reparam.testing.rel_error(want, got) <= 1e-5, str(report)
        assert torch.equal(a, b), "the fused model writes its input differently"
    assert reparam.count(fused, (x,)).bns <= reparam.count(model, (x,)).bns


def test_plain_fx_mistraces_an_alias_write_and_ours_does_not():
    """`y = x; y += t`: torch.fx records `y + t` and the write into x is gone."""
    class M(nn.Module):
        def forward(self, x, t):
            y = x
            y += t
            return x
    x, t = torch.randn(3), torch.randn(3)
    assert not torch.equal(fx.symbolic_trace(M())(x.clone(), t), x + t)  # the defect
    assert torch.equal(trace.symbolic(M(), 2)(x.clone(), t), x + t)


def test_functionalized_graph_writes_nothing_but_its_inputs_at_the_end():
    gm = trace.symbolic(Idiom("writes-its-input").eval())
    writes = [n for n in gm.graph.nodes if mutation.written(n, dict(gm.named_modules())) is not None]
    assert [(n.target, n.next.op) for n in writes] == [("copy_", "output")]


def test_write_through_a_maybe_view_read_later_is_refused_with_a_reason():
    with pytest.raises(mutation.Refused, match="may or may not share memory"):
        trace.symbolic(Idiom("reshape_as-round-trip-written").eval())


def test_writing_a_parameter_in_forward_is_refused_by_symbolic_tracing():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))
            self.conv = conv_bn()

        def forward(self, x):
            self.calls += 1
            return self.conv(x) * self.calls
    with pytest.raises(mutation.Refused, match="writes one of the model's parameters or buffers"):
        trace.symbolic(Counter().eval())


def test_inplace_operators_are_recorded_by_the_tracer():
    class M(nn.Module):
        def forward(self, x):
            x[:, 0] = 1.0
            x *= 2
            return x
    gm = fx.GraphModule(nn.Module(), trace.ConcreteParamTracer().trace(M()))
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [operator.setitem, operator.imul]


class ReturnsCopy(nn.Module):
    """A copy the model returns: the caller may write it, which must not write the model's
    input (or its weights)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        if self.how == "clone-of-written-input":
            y = x.clone()
            x.add_(1)
            return y
        if self.how == "times-one-of-input":
            return x * 1
        return self.w + 0  # a copy of a weight


@pytest.mark.parametrize("how", ["clone-of-written-input", "times-one-of-input", "plus-zero-of-weight"])
def test_a_returned_copy_is_kept(how):
    model, x = ReturnsCopy(how), torch.randn(3)
    fused = reparam.fuse(model)
    a, b = x.clone(), x.clone()
    with torch.no_grad():
        want, got = model(a), fused(b)
    assert torch.equal(want, got) and torch.equal(a, b)
    got.mul_(0)  # the caller writes what it got back
    assert torch.equal(b, a)
    with torch.no_grad():
        assert torch.equal(fused(x.clone()), model(x.clone()))


class HookedInPlace(nn.Module):
    """An in-place module whose pre-hook hands it a new tensor: it writes that one, not x."""

    def __init__(self):
        super().__init__()
        self.act = nn.Hardswish(inplace=True)
        self.act.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
        self.a, self.b = conv_bn(), conv_bn(3, 3, 1)

    def forward(self, x):
        y = self.act(x)
        return self.a(x) + self.b(x) + y


def test_an_in_place_module_with_hooks_is_not_assumed_to_write_its_argument():
    model = randomize(HookedInPlace(), 0).eval()
    fused, report = reparam.fuse_with_report(model)
    x = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        assert reparam.testing.rel_error(model(x.clone()), fused(x.clone())) <= 1e-5, str(report)
    assert any("with hooks" in u.message for u in report.untraced)


class WriteThroughViewOfCopy(nn.Module):
    """The fuzzer's program (seed 45): a write through `view` of a copy (`cat([v])`) of a
    non-contiguous value. Dropping the copy leaves the write's base non-contiguous, where
    replaying the `view` to write it back must still work."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 2, bias=False), nn.Linear(2, 2)

    def forward(self, x):
        v = self.fc(x.movedim(-2, -1)).movedim(-1, -2)
        t = torch.cat([v]).view(v.size(0), -1)
        t.mul_(3.0)
        return self.head(v.mean(-1)), t


@pytest.mark.parametrize("with_inputs", [True, False])
def test_a_write_through_a_view_of_a_dropped_copy(with_inputs):
    model, x = randomize(WriteThroughViewOfCopy(), 0).eval(), torch.randn(2, 3, 7)
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    with torch.no_grad():
        for shape in ((2, 3, 7), (1, 3, 8)):
            x = torch.randn(shape)
            assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(model(x), fused(x)))
    assert not [n for n in report.notes if n.startswith("undone")], report.notes


class SplitPieceWritten(nn.Module):
    """`a, b = torch.split(v, [2, 4], dim=1)` then an in-place write into one piece: the pieces
    are views of v (a tuple of them), so the write reaches v and every piece read later."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 6, 1)
        self.a, self.b = conv_bn(4, 4, 3), conv_bn(4, 4, 1)

    def forward(self, x):
        v = self.stem(x)
        if self.how == "torch.split":
            a, b = torch.split(v, [2, 4], dim=1)
        elif self.how == "method-split":
            a, b = v.split([2, 4], 1)
        else:
            a, b = torch.tensor_split(v, [2], dim=1)
        F.relu(b, inplace=True)
        y = self.a(b) + self.b(b)
        return torch.cat([a, y], 1) + v  # v holds the rectified piece too


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-inputs", "inputs"])
@pytest.mark.parametrize("how", ["torch.split", "method-split", "tensor_split"])
def test_a_write_into_one_piece_of_a_split(how, with_inputs):
    model, x = randomize(SplitPieceWritten(how), 0).eval(), torch.randn(2, 3, 7, 9)
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    with torch.no_grad():
        for shape in ((2, 3, 7, 9), (1, 3, 6, 5)):
            x = torch.randn(shape)
            assert reparam.testing.rel_error(model(x), fused(x)) <= 1e-5, str(report)
    assert reparam.count(fused, (x,)).bns == 0, str(report)
    assert not report.untraced and not [n for n in report.notes if n.startswith("undone")], str(report)
