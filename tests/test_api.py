"""reparam.fuse as a user meets it: inputs left alone, eval function of train-mode models, clear
errors, results that save/script/export, readable names, untraceable models, dtype and device."""
import copy
import io
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import reparam
from reparam.testing import assert_equivalent

from strategies import LOWP_TOL, Sum, randomize


def conv_bn(cin, cout, k, stride=1):
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                                     bn=nn.BatchNorm2d(cout)))


def net(seed=0) -> nn.Module:
    """stem (conv-BN) → features.block (RepVGG: 3×3 conv-BN + 1×1 conv-BN + BN) → ReLU → head conv."""
    block = Sum([conv_bn(4, 4, 3), conv_bn(4, 4, 1), nn.BatchNorm2d(4)], [0, 1, 2], "plus")
    model = nn.Sequential(OrderedDict(stem=conv_bn(3, 4, 3), features=nn.Sequential(OrderedDict(block=block)),
                                      act=nn.ReLU(), head=nn.Conv2d(4, 2, 3)))
    return randomize(model, seed)


def x_(*shape, seed=1, dtype=torch.float32):
    return torch.randn(shape or (2, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: m.training for name, m in model.named_modules()}, repr(model))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_fuse_leaves_the_input_model_alone(with_inputs):
    model = net().train()
    before = snapshot(model)
    reparam.fuse(model, (x_(),) if with_inputs else None)
    state, training, text = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)  # BN statistics included
    assert training == before[1]
    assert text == before[2]


def test_inplace_fuses_without_copying_the_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()  # nothing to merge
    reference = copy.deepcopy(model)
    copied = reparam.fuse(model)
    fused = reparam.fuse(model, inplace=True)
    ptrs = lambda m: {p.data_ptr() for p in m.parameters()}
    assert ptrs(fused) == ptrs(model)
    assert not ptrs(copied) & ptrs(model)
    assert_equivalent(reference, fused, x_())


def test_train_mode_model_fuses_its_eval_function_of_a_copy():
    model = net().train()
    x = x_()
    fused, report = reparam.fuse_with_report(model, (x,))
    assert model.training and not fused.training
    assert_equivalent(copy.deepcopy(model).eval(), fused, x)
    assert "training mode" in str(report)


@pytest.mark.parametrize("args, error, says", [
    (("not a model",), TypeError, "nn.Module"),
    ((torch.randn(3),), TypeError, "nn.Module"),
    ((net(), 5), TypeError, "example_inputs"),
    ((net(), {"x": torch.randn(2, 3, 8, 8)}), TypeError, "example_inputs"),
    ((net(), (torch.randn(2, 7, 8, 8),)), ValueError, "example inputs"),  # wrong channel count
], ids=["str", "tensor", "int-inputs", "dict-inputs", "inputs-that-fail"])
def test_bad_input_raises_a_clear_error(args, error, says):
    with pytest.raises(error, match=says):
        reparam.fuse(*args)


def test_state_dict_round_trip():
    x = x_()
    fused = reparam.fuse(net(seed=0))
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    other = reparam.fuse(net(seed=7))  # same structure, other weights
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        assert torch.equal(other(x), fused(x))


def test_result_is_a_plain_module_tree_whose_submodules_can_be_replaced():
    """Submodules are also plain attributes of their parents (fast lookups in the generated
    code): no extra state-dict keys, pickling works, and a replaced submodule is the one called."""
    x = x_()
    fused = reparam.fuse(net())
    keys = list(fused.state_dict())
    assert len(keys) == len(set(keys)) == len(dict(fused.named_parameters())) + len(dict(fused.named_buffers()))
    again = torch.load(io.BytesIO(_saved(fused)), weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))
        zero = nn.Conv2d(4, 2, 3, bias=False)
        nn.init.zeros_(zero.weight)
        fused.head = zero
        assert torch.equal(fused(x), torch.zeros_like(fused(x)))


def _saved(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def test_torchscript_of_the_result():
    model, x = net().eval(), x_()
    scripted = torch.jit.script(reparam.fuse(model))
    assert_equivalent(model, scripted, x)


def test_torch_export_of_the_result():
    model, x = net().eval(), x_()
    exported = torch.export.export(reparam.fuse(model), (x,)).module()
    assert_equivalent(model, exported, x)


def test_names_keep_the_conv_or_name_the_common_module():
    fused = reparam.fuse(net())
    names = {name for name, m in fused.named_modules() if isinstance(m, nn.Conv2d)}
    assert names == {"stem.conv", "features.block.reparam", "head"}


class DataDependent(nn.Module):
    """`if y.sum() > 0`: neither symbolic tracing nor torch.export can follow it. It reads a
    plain attribute of a child that is fused (as timm's EfficientViT reads `self.attn.resolution`)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # odd in x: a(-x) = -a(x)
        self.b = conv_bn(4, 4, 3)
        self.b.gain = 2.0

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            return self.b(y) * self.b.gain
        return -self.b(y)


@pytest.mark.parametrize("with_inputs", [True, False])
def test_untraceable_module_is_fused_per_traceable_child(with_inputs):
    model = randomize(nn.Sequential(OrderedDict(body=DataDependent(), head=conv_bn(4, 4, 3))), seed=0).eval()
    x = x_()
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    assert "body" in [u.path for u in report.untraced]
    assert all(u.message for u in report.untraced)
    assert reparam.count(fused, (x,)).bns == 0
    assert {bool(model.body.a(sign * x).sum() > 0) for sign in (1, -1)} == {True, False}
    for sign in (1, -1):  # both sides of the `if`
        assert_equivalent(model, fused, sign * x)


class ShapeChecked(nn.Module):
    """Checks its input's shape in Python: symbolic tracing fails, torch.export specializes.
    sum: a(x) + b(x) merges across the children (one graph kept); else b(relu(a(x)))."""

    def __init__(self, sum_: bool):
        super().__init__()
        self.a, self.b, self.sum = conv_bn(4, 4, 3), conv_bn(4, 4, 1 if sum_ else 3), sum_

    def forward(self, x):
        if x.shape[1] != 4:
            raise ValueError("expected 4 channels")
        return self.a(x) + self.b(x) if self.sum else self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("sum_", [True, False])
def test_exported_graph_is_kept_only_where_it_merges_across_children(sum_):
    model, x = randomize(ShapeChecked(sum_), seed=0).eval(), x_(2, 4, 8, 8)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert_equivalent(model, fused, x)
    assert reparam.count(fused, (x,)).bns == 0
    if sum_:  # the exported graph: one conv
        assert isinstance(fused, fx.GraphModule) and reparam.count(fused, (x,)).convs == 1
    else:  # eager glue around two fused children, which runs faster than an exported graph
        assert type(fused) is ShapeChecked and [u.path for u in report.untraced] == ["<root>"]
        assert all(isinstance(c, fx.GraphModule) for c in fused.children())


class SizeBranch(nn.Module):
    """Branches on a size (fuzz seeds 23, 24): torch.export keeps every size dynamic, its range
    constraints say so, and a guard `x.size()[2] // 2 == 1` holds the branch the trace took."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3), conv_bn(4, 4, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return y + 1 if x.size(2) // 2 == 1 else y - 1


def test_an_exported_graph_whose_guards_fix_a_size_says_shape_specialized():
    model, x = randomize(SizeBranch(), seed=0).eval(), x_(2, 4, 3, 7)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert_equivalent(model, fused, x)
    assert reparam.count(fused, (x,)).convs == 1
    note = [n for n in report.notes if "shape-specialized" in n]
    assert note and "x.size()[2] // 2 == 1" in note[0], report.notes
    with pytest.raises(Exception, match="Guard failed"):
        fused(x_(2, 4, 5, 7))


def test_an_exported_graph_whose_guards_hold_at_other_sizes_is_not_shape_specialized():
    model, x = randomize(ShapeChecked(True), seed=0).eval(), x_(2, 4, 8, 8)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert not [n for n in report.notes if "shape-specialized" in n], report.notes
    assert_equivalent(model, fused, x_(3, 4, 11, 6))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                         (torch.bfloat16, LOWP_TOL[torch.bfloat16])])
def test_dtype_is_kept(dtype, rtol):
    model = net().to(dtype).eval()
    x = x_(dtype=dtype)
    fused = reparam.fuse(model, (x,))
    assert {p.dtype for p in fused.parameters()} == {dtype}
    # bfloat16: against the float32 function of the same rounded weights
    reference = copy.deepcopy(model).float() if dtype == torch.bfloat16 else model
    with torch.no_grad():
        out = fused(x)
        assert out.dtype == dtype
        assert reparam.testing.rel_error(reference(x.to(reference.head.weight.dtype)), out) <= rtol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_is_kept():
    model, x = net().cuda().eval(), x_().cuda()
    fused = reparam.fuse(model, (x,))
    assert {p.device.type for p in fused.parameters()} == {"cuda"}
    assert_equivalent(model, fused, x)


def test_report_counts_and_error():
    model, x = net().eval(), x_()
    fused, report = reparam.fuse_with_report(model, (x,))
    assert report.before == reparam.count(model, (x,))
    assert report.after == reparam.count(fused, (x,))
    assert (report.before.convs, report.before.bns) == (4, 4)
    assert (report.after.convs, report.after.bns) == (3, 0)
    assert report.max_rel_error <= 1e-5 and math.isfinite(report.max_rel_error)
    assert {r.rule for r in report.rewrites} >= {"merge_sequential", "merge_sum"}
    assert "merge_sum" in str(report) and reparam.explain(model, (x,)).after == report.after


class Layer(nn.Module):
    """A user's layer: attributes the parent reads, an `extra_repr` and `_apply` reading children
    that fusing merges away."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn, self.index, self.scale = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), 0, torch.ones(1)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) * self.scale

    def extra_repr(self):
        return f"bn eps={self.bn.eps}"

    def _apply(self, fn, *args, **kwargs):
        self.bn.eps = self.bn.eps  # reads a child the fused graph no longer holds
        return super()._apply(fn, *args, **kwargs)


class Loops(nn.Module):
    """Untraceable (a size check); iterates a list literal, a slice, a comprehension and a zip,
    reads plain data of the elements and passes them to its own method."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Layer(4), Layer(4)
        self.blocks = nn.ModuleList([Layer(4) for _ in range(3)])
        self.pairs = nn.ModuleList([Layer(4) for _ in range(2)])

    def forward(self, x):
        if x.shape[1] != 4:
            raise ValueError("4 channels expected")
        for m in [self.a, self.b]:
            x = self.run(m, x) + m.index
        for m in self.blocks[:-1]:
            x = m(x)
        x = sum(m(x) for m in self.blocks[-1:])
        for i, (m, n) in enumerate(zip(self.pairs, self.pairs)):
            x = m(x) + n.index
        return x

    def run(self, m, x):
        return m(x) if isinstance(m, Layer) else x


@pytest.mark.parametrize("with_inputs", [False, True])
def test_layers_under_python_are_fused_in_place(with_inputs):
    model = randomize(Loops(), seed=0).eval()
    x = x_(1, 4, 9, 11)
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    layers = [fused.a, fused.b, *fused.blocks, *fused.pairs]
    assert all(isinstance(m, Layer) and not hasattr(m, "bn") for m in layers), report
    assert reparam.count(fused, (x,)).bns == 0 and not report.norms_left
    assert "Layer" in repr(fused) and fused.a.index == 0
    moved = copy.deepcopy(fused).to(torch.float64)
    assert isinstance(moved.blocks[0], Layer) and moved.blocks[0].conv.weight.dtype == torch.float64
    assert_equivalent(model, fused, x)
    assert hasattr(model.a, "bn")  # the user's model is untouched


class LeafConvs(nn.Module):
    """No submodules: its own kernels, and a size check fx cannot trace."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.k0 = nn.Parameter(torch.randn(4, 3, 1, 1, generator=gen))
        self.k1 = nn.Parameter(torch.randn(4, 4, 3, 3, generator=gen))

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("3 channels expected")
        return F.conv2d(F.conv2d(x, self.k0), self.k1)


def test_an_untraceable_module_without_children_is_exported_with_example_inputs():
    """Nothing below it to fuse one by one: with example inputs torch.export traces it."""
    model, x = LeafConvs().eval(), x_(1, 3, 9, 11)
    fused = reparam.fuse(model, (x,))
    assert reparam.count(fused, (x,)).convs == 1
    assert_equivalent(model, fused, x)
