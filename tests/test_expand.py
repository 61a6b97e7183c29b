"""reparam.expand: conv → BN pairs of plain networks become training blocks, and reparam.fuse
collapses them back to the plain network's convs.

Properties over random plain networks (k in {1, 3, 5}, stride 1/2, padding k // 2 or less,
dilation, groups incl. depthwise, residual connections), for every recipe:
  * preserve_function: the expanded model computes the model's eval function at expansion;
  * the round trip: fuse(expand(m)) runs as many convs as fuse(m), with the same kernels, and
    computes the expanded model's function (random weights and BN statistics everywhere).
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import reparam
from reparam.expand import RECIPES, Branches
from reparam.testing import rel_error
from strategies import check_equivalent, inputs, randomize, seeds


# ---- random plain networks ----

class ConvBNAct(nn.Sequential):
    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


class Residual(nn.Module):
    """relu(x + BN(conv(relu(BN(conv(x))))))."""

    def __init__(self, a: nn.Conv2d, b: nn.Conv2d):
        super().__init__()
        self.a, self.bn_a, self.b, self.bn_b = a, nn.BatchNorm2d(a.out_channels), b, nn.BatchNorm2d(b.out_channels)

    def forward(self, x):
        return torch.relu(x + self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))


class Plain(nn.Sequential):
    """Layers, then a global average (so the output does not depend on where the net ends)."""


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_layers(draw, cin, size, same=False):
    """(an nn.Conv2d reading cin channels of a size×size input, its output size): groups among
    the divisors of cin (depthwise included), k in {1, 3, 5}, padding k // 2 or less, stride
    1 or 2, dilation 1 or 2; `same`: shape-preserving (a residual branch)."""
    groups = draw(st.sampled_from(_divisors(cin) + [cin]))
    cout = cin if same else groups * draw(st.integers(1, max(1, 6 // groups)))
    k = draw(st.sampled_from([1, 3, 5]))
    d = 1 if same or k == 1 else draw(st.sampled_from([1, 1, 2]))
    p = d * (k // 2) if same else draw(st.sampled_from([d * (k // 2), d * (k // 2), 0]))
    s = 1 if same else draw(st.sampled_from([1, 2]))
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 2:  # too small for this input: keep the size
        p, s, out = d * (k // 2), 1, size
    return nn.Conv2d(cin, cout, k, s, p, d, groups, bias=draw(st.booleans())), out


@st.composite
def plain_nets(draw):
    """(model in eval mode with random weights and BN statistics, input (2, C, H, H))."""
    size = first = draw(st.integers(6, 12))
    c = cin = draw(st.integers(1, 4))
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            conv, size = draw(conv_layers(c, size))
            layers.append(ConvBNAct(conv))
            c = conv.out_channels
        else:
            layers.append(Residual(draw(conv_layers(c, size, same=True))[0], draw(conv_layers(c, size, same=True))[0]))
    seed = draw(seeds)
    model = randomize(Plain(*layers), seed).eval()
    note(repr(model))
    return model, inputs((2, cin, first, first), seed)


def _eligible(model: nn.Module, recipe: str) -> int:
    """How many of a plain net's conv → BN pairs the recipe expands by default: k > 1, and for
    dbb (whose average pool cannot be dilated) dilation 1."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1
               and (recipe != "dbb" or m.dilation == (1, 1)))


class _Convs(TorchDispatchMode):
    """The convolutions one forward runs: (weight shape, stride, padding, dilation, groups)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ == "convolution":
            self.seen.append((tuple(args[1].shape), *map(tuple, args[3:6]), args[8]))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def conv_kernels(model, x) -> list:
    counter = _Convs()
    with counter:
        model(x)
    return sorted(counter.seen)


# ---- the properties ----

@pytest.mark.parametrize("recipe", sorted(RECIPES))
@given(net=plain_nets())
def test_expanded_model_computes_the_original_function(recipe, net):
    model, x = net
    expanded, report = reparam.expand_with_report(model, recipe, example_inputs=(x,))
    note(str(report))
    assert len(report.expanded) == _eligible(model, recipe)
    assert report.max_rel_error <= 1e-5
    assert rel_error(model(x), expanded.eval()(x)) <= 1e-5


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@given(net=plain_nets(), seed=seeds)
def test_fuse_of_expanded_runs_the_plain_convs_and_the_expanded_function(recipe, net, seed):
    model, x = net
    expanded = randomize(reparam.expand(model, recipe), seed).eval()  # every branch non-trivial
    fused, report = reparam.fuse_with_report(expanded, (x,))
    note(str(report))
    assert conv_kernels(fused, x) == conv_kernels(reparam.fuse(model, (x,)), x)
    assert reparam.count(fused, (x,)).bns == 0
    check_equivalent(expanded, fused, x, 1e-5)


# ---- explicit cases ----

def _vgg(seed=0) -> nn.Module:
    """A small VGG-style plain net: 3×3 convs (one strided, one depthwise), a 1×1, a residual."""
    torch.manual_seed(seed)
    return randomize(Plain(ConvBNAct(nn.Conv2d(3, 8, 3, 2, 1)), ConvBNAct(nn.Conv2d(8, 8, 3, 1, 1, groups=8)),
                           Residual(nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)),
                           ConvBNAct(nn.Conv2d(8, 6, 1))), seed).eval()


X = inputs((2, 3, 16, 16), 0)


def test_an_expanded_model_is_refused_with_the_reason():
    expanded = reparam.expand(_vgg(), "repvgg")
    with pytest.raises(ValueError, match="already expanded .*'0.0'.* recipe 'repvgg'"):
        reparam.expand(expanded, "dbb")


def test_expand_copies_and_never_mutates_the_model():
    model = _vgg().train()
    before, text = copy.deepcopy(model.state_dict()), repr(model)
    expanded = reparam.expand(model, "dbb", example_inputs=(X,))
    assert expanded is not model and repr(model) == text and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in expanded.modules())  # the model's mode, new modules included
    assert reparam.expand(model, "dbb", inplace=True) is model and isinstance(model[0][0], Branches)


def test_the_block_replaces_the_conv_and_identity_the_bn_in_the_models_own_class():
    expanded = reparam.expand(_vgg(), "gcblock", n_paths=3)
    assert type(expanded) is Plain and isinstance(expanded[2].b, Branches) and isinstance(expanded[2].bn_b, nn.Identity)
    assert list(expanded[2].b.branches) == ["path0", "path1", "path2", "path_1x1", "identity"]


@pytest.mark.parametrize("select, expanded", [
    ("2.*", ["2.a", "2.b"]),
    (lambda path, conv: conv.groups == conv.in_channels, ["1.0"]),  # depthwise only
    (lambda path, conv: conv.kernel_size == (1, 1), ["3.0"]),       # a 1×1, not expanded by default
])
def test_select_chooses_the_convs_and_the_report_says_why_the_others_were_left(select, expanded):
    model, report = reparam.expand_with_report(_vgg(), "repvgg", select=select)
    assert [e.path for e in report.expanded] == expanded
    assert {s.path for s in report.skipped} == {"0.0", "1.0", "2.a", "2.b", "3.0"} - set(expanded)
    assert all("not selected" in s.reason for s in report.skipped)
    assert conv_kernels(reparam.fuse(model, (X,)), X) == conv_kernels(reparam.fuse(_vgg(), (X,)), X)


def test_by_default_1x1_convs_are_left_alone():
    report = reparam.expand_with_report(_vgg(), "acnet")[1]
    assert [(s.path, "1×1 kernel" in s.reason) for s in report.skipped] == [("3.0", True)]
    assert "4 conv → BN pairs expanded" in str(report)


def test_state_dict_round_trips_into_a_fresh_expansion():
    trained = randomize(reparam.expand(_vgg(), "dbb"), 1).eval()
    fresh = reparam.expand(_vgg(), "dbb").eval()
    fresh.load_state_dict(trained.state_dict())  # strict: the same keys and shapes
    assert torch.equal(fresh(X), trained(X))


def test_an_expanded_model_trains_and_its_new_branches_learn():
    expanded = reparam.expand(_vgg(), "gcblock").train()
    opt = torch.optim.SGD(expanded.parameters(), lr=0.1)
    zero = [m for m in expanded.modules() if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]
    assert zero  # the new branches' last BNs start at zero
    for _ in range(2):  # at step 0 only the zero BNs get gradients; then the branches behind them
        opt.zero_grad()
        expanded(X).square().mean().backward()
        opt.step()
    assert all(m.weight.any() for m in zero)
    assert all(p.grad is not None and p.grad.any() for p in expanded.parameters())


def _ddp_train(rank: int, world: int, folder: str, steps: int):
    """One rank of test_an_expanded_model_trains_under_ddp: expand, wrap, train on this rank's
    batch, save the parameters, the gradients of the last step and the state_dict."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        ddp = nn.parallel.DistributedDataParallel(reparam.expand(_vgg(), "gcblock").train())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x, target = inputs((4, 3, 16, 16), 10 + rank), inputs((4, 6, 8, 8), 20 + rank)  # a batch per rank
        for _ in range(steps):
            opt.zero_grad()
            (ddp(x) - target).square().mean().backward()
            opt.step()
        model = ddp.module
        torch.save({"params": {k: p.detach() for k, p in model.named_parameters()},
                    "grads": {k: p.grad for k, p in model.named_parameters()},
                    "state_dict": model.state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_an_expanded_model_trains_under_ddp_and_its_state_dict_fuses_to_the_plain_convs(tmp_path):
    """Two gloo ranks on CPU: DDP sees ordinary modules (the new branches are parameters and BN
    buffers like any other), the gradients reach every new branch, the ranks stay in step."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world, steps = 2, 3
    mp.spawn(_ddp_train, args=(world, str(tmp_path), steps), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    fresh = reparam.expand(_vgg(), "gcblock")  # the ranks' start: DDP broadcasts rank 0's parameters
    start = {k: p.detach().clone() for k, p in fresh.named_parameters()}
    new = {f"{path}.branches.{name}.{k}": f"{path}.branches.{name}"  # parameter → its new branch
           for path, m in fresh.named_modules() if isinstance(m, Branches)
           for name, branch in list(m.branches.items())[1:] for k, _ in branch.named_parameters()}
    # path1, path_1x1 and identity in 4 blocks, but the strided first one has no identity
    assert len(set(new.values())) == 11 and set(new) <= set(ranks[0]["grads"])
    grads = ranks[0]["grads"]  # the last step's, averaged over the ranks
    assert all(grads[k] is not None for k in grads) and all(grads[k].any() for k in new), \
        [k for k in grads if grads[k] is None or (k in new and not grads[k].any())]
    for k, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][k]), f"the ranks disagree on {k}"
    # every new branch learned (at first only its last, zero BN moves: the gradient behind a zero
    # BN starts at zero, and three steps move some weights by less than a float32 ulp)
    moved = {new[k] for k in new if not torch.equal(ranks[0]["params"][k], start[k])}
    assert moved == set(new.values()), sorted(set(new.values()) - moved)

    state = ranks[0]["state_dict"]
    fresh.load_state_dict(state)  # strict: the same keys and shapes
    assert list(fresh.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    fresh.eval()
    fused = reparam.fuse(fresh, (X,))
    assert conv_kernels(fused, X) == conv_kernels(reparam.fuse(_vgg(), (X,)), X)
    assert reparam.count(fused, (X,)).bns == 0
    check_equivalent(fresh, fused, X, 1e-5)


def test_preserve_function_false_starts_the_new_branches_from_default_init():
    model = _vgg()
    expanded, report = reparam.expand_with_report(model, "repvgg", preserve_function=False, example_inputs=(X,))
    assert report.max_rel_error > 1e-3 and "preserve_function=False" in str(report)
    assert not [m for m in expanded.modules() if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]


class ConvPlusScaled1x1(nn.Module):
    """A user's block: the conv → BN plus a 1×1 conv → BN that starts at zero."""

    def __init__(self, conv, bn):
        super().__init__()
        self.main = nn.Sequential(conv, bn)
        self.side = nn.Sequential(nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride,
                                            groups=conv.groups, bias=False), nn.BatchNorm2d(conv.out_channels))
        nn.init.zeros_(self.side[1].weight)

    def forward(self, x):
        return self.main(x) + self.side(x)


def test_a_user_recipe_is_a_callable_and_its_blocks_are_checked():
    model = _vgg()
    expanded, report = reparam.expand_with_report(model, ConvPlusScaled1x1, example_inputs=(X,))
    assert [e.recipe for e in report.expanded] == ["ConvPlusScaled1x1"] * 4 and report.max_rel_error <= 1e-6
    fused = reparam.fuse(randomize(expanded, 2).eval(), (X,))
    assert conv_kernels(fused, X) == conv_kernels(reparam.fuse(model, (X,)), X)
    with pytest.raises(ValueError, match="already expanded"):
        reparam.expand(expanded)

    def not_preserving(conv, bn):
        return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels))  # a fresh BN: another function

    report = reparam.expand_with_report(model, not_preserving)[1]
    assert not report.expanded and all("another function" in s.reason for s in report.skipped[:4])
    assert len(reparam.expand_with_report(model, not_preserving, preserve_function=False)[1].expanded) == 4


def test_a_user_recipe_may_decline_and_a_block_that_fails_is_left_out():
    from reparam.expand import Refused

    def only_dense(conv, bn):
        if conv.groups > 1:
            raise Refused("grouped: not for this recipe")
        return ConvPlusScaled1x1(conv, bn)

    model = _vgg()
    report = reparam.expand_with_report(model, only_dense)[1]
    assert [(s.path, s.reason) for s in report.skipped][:1] == [("1.0", "grouped: not for this recipe")]
    assert len(report.expanded) == 3
    wrong = lambda conv, bn: nn.Conv2d(conv.in_channels + 1, conv.out_channels, 1)
    expanded, report = reparam.expand_with_report(model, wrong)
    assert not report.expanded and all("fails on a" in s.reason for s in report.skipped[:4])
    assert torch.equal(expanded(X), model(X))  # nothing changed, not even the modules it was given


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class Tapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) * torch.sigmoid(y)


class TwoBranches(nn.Module):
    """BN(conv3(x)) + BN(conv1(x)) + x: already re-parameterizable (RepVGG's form)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.b, self.bn_b = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x)) + x


def _hooked():
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
    m[0].register_forward_hook(lambda *a: None)
    return m


@pytest.mark.parametrize("model, reason", [
    (Shared(), "called from 2 places"),
    (Tapped(), "read by"),
    (TwoBranches(), "already a branch of a linear multi-branch block"),
    (_hooked(), "hooks"),
    (nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False)), "running statistics"),
    (nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(3)), "padding_mode"),
    (nn.Sequential(nn.Conv2d(3, 3, 3, padding="same"), nn.BatchNorm2d(3)), "padding='same'"),
    (nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(3)), "read by"),
], ids=["shared", "tapped", "multi-branch", "hooks", "batch-stats", "reflect", "same", "relu-between"])
def test_places_left_alone_and_why(model, reason):
    expanded, report = reparam.expand_with_report(model, "repvgg")
    assert not report.expanded and report.skipped
    assert all(reason in s.reason for s in report.skipped), str(report)
    assert not any(isinstance(m, Branches) for m in expanded.modules())


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace the parent; its children are searched."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else self.bn(self.conv(x))


def test_an_untraceable_model_is_searched_child_by_child():
    model = randomize(Untraceable(), 0).eval()
    expanded, report = reparam.expand_with_report(model, "dbb")
    assert [e.path for e in report.expanded] == ["body.0"] and report.untraced[0].path == "<root>"
    assert [(s.path, "not seen in a traced graph" in s.reason) for s in report.skipped] == [("conv", True)]
    assert rel_error(model(X.abs()), expanded.eval()(X.abs())) <= 1e-6


def test_unknown_recipes_and_options_are_refused():
    with pytest.raises(ValueError, match="unknown recipe 'repvg'"):
        reparam.expand(_vgg(), "repvg")
    with pytest.raises(TypeError, match="takes no option"):
        reparam.expand(_vgg(), "acnet", n_paths=3)
    with pytest.raises(ValueError, match="n_paths >= 1"):
        reparam.expand(_vgg(), "gcblock", n_paths=0)


def test_gcnet_expands_only_its_plain_pairs_and_fuses_back():
    gcnet = pytest.importorskip("gcnet")
    model = randomize(gcnet.gcnet_s(num_classes=3, channels=4, head_channels=8, ppm_channels=8), 0).eval()
    x = inputs((1, 3, 64, 64), 0)
    expanded, report = reparam.expand_with_report(model, "acnet", example_inputs=(x,))
    assert sorted(e.path for e in report.expanded) == [
        "aux_head.conv.conv", "fusion4.down.0.conv", "fusion5.down.0.conv", "fusion5.down.1.conv",
        "head.conv.conv", "stem.0.conv", "stem.1.conv"]
    assert all("already a branch" in s.reason for s in report.skipped if ".paths_3x3." in s.path)
    fused = reparam.fuse(randomize(expanded, 1).eval(), (x,))
    assert conv_kernels(fused, x) == conv_kernels(reparam.fuse(model, (x,)), x)
    check_equivalent(expanded, fused, x, 1e-5)
