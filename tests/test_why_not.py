"""The three ten-line models on which torch.fx's `fuse` or PT2E's conv-BN fold miscompile
(docs/why_not.md): `reparam.fuse` is exact on each, with and without example inputs, and says
why where it leaves a pair unfolded. fx's error is recorded as measured, not pinned tightly."""
import copy

import pytest
import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

import reparam
from reparam.testing import rel_error


def random_bn(model):
    """Eval mode, every BatchNorm with random statistics and affine (fresh ones are the identity)."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-2, 2)
                bn.running_var.uniform_(0.1, 4)
                bn.weight.uniform_(-2, 2)
                bn.bias.uniform_(-2, 2)
    return model.eval()


class ResidualRead(nn.Module):
    """The conv output is read by its BN and by the residual add."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class CalledTwice(nn.Module):
    """One bias-free conv+BN pair, called at two places."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.bn(self.conv(torch.relu(y)))


class TwoBNs(nn.Module):
    """One conv read by two different BNs."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn1(y) + self.bn2(y)


def case(cls):
    torch.manual_seed(0)
    model = random_bn(cls())
    return model, torch.randn(2, model.conv.in_channels, 16, 16)


MODELS = [ResidualRead, CalledTwice, TwoBNs]


@pytest.mark.parametrize("with_inputs", [True, False], ids=["example_inputs", "no_inputs"])
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_reparam_is_exact(cls, with_inputs):
    model, x = case(cls)
    fused, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    assert rel_error(model(x), fused(x)) <= 1e-5


@pytest.mark.parametrize("cls", [ResidualRead, TwoBNs], ids=lambda c: c.__name__)
def test_exact_rewrites_fold_every_bn(cls):
    """bn(y) + y and bn1(y) + bn2(y) are one per-channel affine of y: the conv absorbs it."""
    model, x = case(cls)
    fused, report = reparam.fuse_with_report(model, (x,))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not report.skipped and not report.norms_left


@pytest.mark.parametrize("with_inputs", [True, False], ids=["example_inputs", "no_inputs"])
def test_a_pair_called_twice_is_refused_with_its_reason(with_inputs):
    model, x = case(CalledTwice)
    _, report = reparam.fuse_with_report(model, (x,) if with_inputs else None)
    reason = "module 'bn' is called from 2 places; fusing one call would untie its weights"
    assert any(s.rule == "merge_sequential" and s.path == "bn" and s.reason == reason for s in report.skipped)
    assert [(s.path, s.reason) for s in report.norms_left] == [("bn", reason)]


def test_fx_fuse_miscompiles_a_pair_called_twice():
    """fx's `fuse` folds the BN into the shared conv at each call: twice in all (measured: 3.46)."""
    model, x = case(CalledTwice)
    assert rel_error(model(x), fx_optimization.fuse(copy.deepcopy(model))(x)) > 0.1


@pytest.mark.parametrize("cls", [ResidualRead, TwoBNs], ids=lambda c: c.__name__)
def test_fx_fuse_skips_a_conv_read_twice(cls):
    """fx's `fuse` checks that the conv has one user: these it leaves alone, exactly."""
    model, x = case(cls)
    assert rel_error(model(x), fx_optimization.fuse(copy.deepcopy(model))(x)) <= 1e-5


def pt2e_fold(model, x):
    """torchao's PT2E conv-BN fold alone: `prepare_pt2e` on the exported graph (it runs
    `_fuse_conv_bn_`) with a quantizer that annotates nothing, so no observer changes a value."""
    quantize_pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantizer import Quantizer

    class AnnotateNothing(Quantizer):
        def annotate(self, model):
            return model

        def validate(self, model):
            pass

    return quantize_pt2e.prepare_pt2e(torch.export.export(model, (x,)).module(), AnnotateNothing())


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_pt2e_fold_miscompiles_all_three(cls):
    """It folds a BN into a conv whose output something else reads (measured: 1.06 to 1.29)."""
    model, x = case(cls)
    assert rel_error(model(x), pt2e_fold(copy.deepcopy(model), x)(x)) > 0.1
