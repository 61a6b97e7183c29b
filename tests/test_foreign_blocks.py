"""Published-style blocks, written the way their authors write them (issue 10's corpus).

Each block is our own short rendering of a public reference implementation's idiom (DBB's
BN-and-pad by slice assignment, ACNet's crop layer, ECBSR's SeqConv3x3, RepVGG's SE block,
torchvision's BasicBlock, MobileOne, ...). Every expectation is stated against eager PyTorch:
"equal" means the fused model's outputs, run on fresh clones of the input, are within
max|a - b| / max|a| ≤ 1e-5 (float32) / 1e-10 (float64) of the eval-mode model's, and the
input's value after the call agrees too (a model that writes its input must be fused into one
that writes it the same way). `fuse` must never write the caller's example input.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from foreign import TOL, make_input, randomize, rel_error, run


# ---- helpers ----

def seeded(model: nn.Module, seed: int = 0, dtype=torch.float32) -> nn.Module:
    return randomize(model.to(dtype), seed).eval()


def x_(*shape, seed=1, dtype=torch.float32) -> torch.Tensor:
    return make_input(shape, seed, dtype)


def fuse(model, x, with_inputs: bool, **kwargs):
    """fuse_with_report with or without (a clone of) x; the clone must come back unwritten."""
    example = x.clone()
    fused, report = reparam.fuse_with_report(model, (example,) if with_inputs else None, **kwargs)
    assert torch.equal(example, x), "fuse wrote the caller's example input"
    return fused, report


def assert_same(model, fused, x, report=None) -> float:
    """Outputs and the input's value after the call agree (fresh clones for each model)."""
    want, want_after = run(model, (x,))
    got, got_after = run(fused, (x,))
    tol = TOL[x.dtype]
    err = rel_error(want, got)
    assert err <= tol, f"outputs differ: relative error {err:.3g}\n{report or ''}"
    err_in = rel_error(want_after, got_after)
    assert err_in <= tol, f"the input after the call differs: relative error {err_in:.3g}\n{report or ''}"
    return err


def ops(model, x) -> tuple[int, int]:
    """(conv/matmul ops, BN ops) one forward on a clone of x runs."""
    s = reparam.count(model, (x.clone(),))
    return s.convs, s.bns


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1) -> nn.Sequential:
    """The `conv_bn` helper of RepVGG / DBB / MobileOne: children named conv and bn."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def conv_bn_relu(cin, cout, stride=1, inplace=True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=inplace))


WITH_INPUTS = pytest.mark.parametrize("with_inputs", [True, False], ids=["with-inputs", "no-inputs"])


# ---- DBB: BN-and-pad by slice assignment ----

class BNAndPadLayer(nn.Module):
    """DBB's layer: BN, then zero padding whose border is overwritten, strip by strip, with the
    BN's output for a zero input (one value per channel)."""

    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / \
                    torch.sqrt(self.bn.running_var + self.bn.eps)
            else:
                pad_values = -self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    """k×k conv-BN + 1×1 conv-BN + (1×1 conv → BN-and-pad → avg pool → BN) + (1×1 conv →
    BN-and-pad → k×k conv-BN), summed with `+=`. Depthwise (groups == out channels): the pool
    branch is a padded avg pool → BN and there is no 1×1 branch, as in DBB."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, internal_channels_1x1_3x3=None):
        super().__init__()
        padding = kernel_size // 2
        self.nonlinear = nn.ReLU()
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, 0))
            self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding))
        self.dbb_avgbn = nn.BatchNorm2d(out_channels)
        internal = internal_channels_1x1_3x3 or (in_channels if groups < out_channels else 2 * in_channels)
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal, affine=True))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, kernel_size, stride, 0,
                                                       groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avgbn(self.dbb_avg(inputs))
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


DBB_CASES = {  # in, out, k, stride, groups, internal width
    "k3": (4, 6, 3, 1, 1, None),
    "stride2": (4, 6, 3, 2, 1, None),
    "groups2": (4, 8, 3, 1, 2, None),
    "depthwise": (6, 6, 3, 1, 6, None),
    "k5": (4, 4, 5, 1, 1, None),
    "internal8-out6": (4, 6, 3, 1, 1, 8),
    "k5-stride2-groups2-internal6": (4, 6, 5, 2, 2, 6),
}


@WITH_INPUTS
@pytest.mark.parametrize("case", list(DBB_CASES))
def test_dbb_with_slice_assignment_padding_fuses_to_one_conv(case, with_inputs):
    cin, cout, k, stride, groups, internal = DBB_CASES[case]
    model = seeded(DiverseBranchBlock(cin, cout, k, stride, groups, internal))
    x = x_(2, cin, 9, 11)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert ops(fused, x) == (1, 0), f"expected 1 conv and 0 BN, got {ops(fused, x)}\n{report}"


# ---- ACNet with the crop layer ----

class CropLayer(nn.Module):
    """ACNet's crop: crop_set (-r, 0) drops r rows at each end, (0, -r) r columns."""

    def __init__(self, crop_set):
        super().__init__()
        self.rows_to_crop = -crop_set[0]
        self.cols_to_crop = -crop_set[1]

    def forward(self, input):
        if self.rows_to_crop == 0 and self.cols_to_crop == 0:
            return input
        if self.rows_to_crop > 0 and self.cols_to_crop == 0:
            return input[:, :, self.rows_to_crop:-self.rows_to_crop, :]
        if self.rows_to_crop == 0 and self.cols_to_crop > 0:
            return input[:, :, :, self.cols_to_crop:-self.cols_to_crop]
        return input[:, :, self.rows_to_crop:-self.rows_to_crop, self.cols_to_crop:-self.cols_to_crop]


class ACBlock(nn.Module):
    """Asymmetric conv block: k×k conv-BN with padding p < k//2, plus a k×1 conv-BN reading the
    input with r = k//2 - p columns cropped and a 1×k conv-BN reading it with r rows cropped
    (each padded p along its long axis), summed."""

    def __init__(self, in_channels, out_channels, kernel_size, padding):
        super().__init__()
        r = kernel_size // 2 - padding
        assert r > 0
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), 1, padding, bias=False)
        self.square_bn = nn.BatchNorm2d(out_channels)
        self.ver_conv_crop_layer = CropLayer((0, -r))
        self.hor_conv_crop_layer = CropLayer((-r, 0))
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), 1, (padding, 0), bias=False)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), 1, (0, padding), bias=False)
        self.ver_bn = nn.BatchNorm2d(out_channels)
        self.hor_bn = nn.BatchNorm2d(out_channels)

    def forward(self, input):
        square_outputs = self.square_bn(self.square_conv(input))
        vertical_outputs = self.ver_bn(self.ver_conv(self.ver_conv_crop_layer(input)))
        horizontal_outputs = self.hor_bn(self.hor_conv(self.hor_conv_crop_layer(input)))
        return square_outputs + vertical_outputs + horizontal_outputs


ACNET_CASES = {"k3-p0": (3, 0), "k5-p1": (5, 1), "k5-p0": (5, 0)}


@WITH_INPUTS
@pytest.mark.parametrize("case", list(ACNET_CASES))
def test_acnet_crops_fuse_to_one_conv(case, with_inputs):
    """The crops are convs with adjusted padding: the block is one k×k conv with padding p."""
    k, p = ACNET_CASES[case]
    model = seeded(ACBlock(4, 6, k, p))
    x = x_(2, 4, 9, 10)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert ops(fused, x) == (1, 0), f"expected 1 conv and 0 BN, got {ops(fused, x)}\n{report}"


# ---- ECBSR's SeqConv3x3 (conv1x1-conv3x3) ----


def _bias_padded(x, k0, b0):
    """ECBSR's 1×1 conv, padded by one with its own bias by slice assignment (the authors' idiom)."""
    y0 = F.conv2d(input=x, weight=k0, bias=b0, stride=1)
    y0 = F.pad(y0, (1, 1, 1, 1), "constant", 0)
    b0_pad = b0.view(1, -1, 1, 1)
    y0[:, :, 0:1, :] = b0_pad
    y0[:, :, -1:, :] = b0_pad
    y0[:, :, :, 0:1] = b0_pad
    y0[:, :, :, -1:] = b0_pad
    return y0

class SeqConv3x3(nn.Module):
    """1×1 conv with bias, zero padding with the border overwritten by that bias, unpadded
    3×3 conv: functional calls with keyword arguments, weights taken from throwaway convs."""

    def __init__(self, inp_planes, out_planes, depth_multiplier):
        super().__init__()
        self.mid_planes = int(out_planes * depth_multiplier)
        conv0 = nn.Conv2d(inp_planes, self.mid_planes, kernel_size=1, padding=0)
        self.k0 = conv0.weight
        self.b0 = conv0.bias
        conv1 = nn.Conv2d(self.mid_planes, out_planes, kernel_size=3)
        self.k1 = conv1.weight
        self.b1 = conv1.bias

    def forward(self, x):
        y1 = F.conv2d(input=_bias_padded(x, self.k0, self.b0), weight=self.k1, bias=self.b1, stride=1)
        return y1


@torch.no_grad()
def _init_seqconv(m: SeqConv3x3, seed: int) -> SeqConv3x3:
    g = torch.Generator().manual_seed(seed)
    for p in (m.k0, m.b0, m.k1, m.b1):
        std = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.5
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return m.eval()


@WITH_INPUTS
@pytest.mark.parametrize("inp, out, multiplier", [(4, 4, 2), (4, 4, 1), (3, 6, 2)])
def test_ecbsr_seqconv_1x1_3x3_fuses_to_one_conv(inp, out, multiplier, with_inputs):
    """The bias written into the border is what the 1×1 conv gives on zero padding, so the
    block is one padded 3×3 conv (and it costs fewer MACs than the two convs here)."""
    model = _init_seqconv(SeqConv3x3(inp, out, multiplier), seed=3)
    x = x_(2, inp, 7, 9)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert ops(fused, x)[0] == 1, f"expected 1 conv, got {ops(fused, x)}\n{report}"


# ---- ECBSR's ECB: four SeqConv3x3 types, identity, PReLU; deploy form built in forward ----

SOBEL_X = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
SOBEL_Y = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
LAPLACIAN = [[0, 1, 0], [1, -4, 1], [0, 1, 0]]


class EdgeSeqConv3x3(SeqConv3x3):
    """SeqConv3x3 of every `seq_type`: 'conv1x1-conv3x3' (the parent's), or 'conv1x1-sobelx' /
    '-sobely' / '-laplacian': a 1×1 conv, the bias padding, then a fixed per-channel edge mask
    times a learnt scale, as a depthwise conv (`groups=out_planes`). `rep_params` is the authors'
    converter: the one 3×3 kernel and bias, built from the parameters with convs."""

    def __init__(self, seq_type, inp_planes, out_planes, depth_multiplier=1):
        if seq_type == "conv1x1-conv3x3":
            super().__init__(inp_planes, out_planes, depth_multiplier)
        else:
            nn.Module.__init__(self)
            conv0 = nn.Conv2d(inp_planes, out_planes, kernel_size=1, padding=0)
            self.k0, self.b0 = conv0.weight, conv0.bias
            self.scale = nn.Parameter(torch.randn(out_planes, 1, 1, 1) * 1e-3)
            self.bias = nn.Parameter(torch.randn(out_planes) * 1e-3)
            taps = {"conv1x1-sobelx": SOBEL_X, "conv1x1-sobely": SOBEL_Y, "conv1x1-laplacian": LAPLACIAN}[seq_type]
            self.mask = torch.zeros((out_planes, 1, 3, 3), dtype=torch.float32)
            for i in range(out_planes):
                self.mask[i, 0] = torch.tensor(taps, dtype=torch.float32)
            self.mask = nn.Parameter(data=self.mask, requires_grad=False)
        self.type, self.out_planes = seq_type, out_planes

    def forward(self, x):
        if self.type == "conv1x1-conv3x3":
            return super().forward(x)
        y0 = _bias_padded(x, self.k0, self.b0)
        return F.conv2d(input=y0, weight=self.scale * self.mask, bias=self.bias, stride=1, groups=self.out_planes)

    def rep_params(self):
        if self.type == "conv1x1-conv3x3":
            k1, b1, mid = self.k1, self.b1, self.mid_planes
        else:
            tmp = self.scale * self.mask
            k1 = torch.zeros((self.out_planes, self.out_planes, 3, 3), dtype=tmp.dtype)
            for i in range(self.out_planes):
                k1[i, i, :, :] = tmp[i, 0, :, :]
            b1, mid = self.bias, self.out_planes
        RK = F.conv2d(input=k1, weight=self.k0.permute(1, 0, 2, 3))
        RB = torch.ones(1, mid, 3, 3, dtype=k1.dtype) * self.b0.view(1, -1, 1, 1)
        RB = F.conv2d(input=RB, weight=k1).view(-1,) + b1
        return RK, RB


class ECB(nn.Module):
    """The edge-oriented conv block: 3×3 + conv1x1-conv3x3 + Sobel x + Sobel y + Laplacian
    (+ the input when `with_idt`), then PReLU. As the authors write it, eval mode runs the
    deploy form: one conv with the kernel `rep_params()` builds at every call."""

    def __init__(self, inp_planes, out_planes, depth_multiplier, with_idt=False):
        super().__init__()
        self.out_planes = out_planes
        self.with_idt = with_idt and inp_planes == out_planes
        self.conv3x3 = nn.Conv2d(inp_planes, out_planes, kernel_size=3, padding=1)
        self.conv1x1_3x3 = EdgeSeqConv3x3("conv1x1-conv3x3", inp_planes, out_planes, depth_multiplier)
        self.conv1x1_sbx = EdgeSeqConv3x3("conv1x1-sobelx", inp_planes, out_planes, -1)
        self.conv1x1_sby = EdgeSeqConv3x3("conv1x1-sobely", inp_planes, out_planes, -1)
        self.conv1x1_lpl = EdgeSeqConv3x3("conv1x1-laplacian", inp_planes, out_planes, -1)
        self.act = nn.PReLU(num_parameters=out_planes)

    def forward(self, x):
        if self.training:
            y = self.conv3x3(x) + self.conv1x1_3x3(x) + self.conv1x1_sbx(x) + self.conv1x1_sby(x) + \
                self.conv1x1_lpl(x)
            if self.with_idt:
                y += x
        else:
            RK, RB = self.rep_params()
            y = F.conv2d(input=x, weight=RK, bias=RB, stride=1, padding=1)
        return self.act(y)

    def rep_params(self):
        K0, B0 = self.conv3x3.weight, self.conv3x3.bias
        K1, B1 = self.conv1x1_3x3.rep_params()
        K2, B2 = self.conv1x1_sbx.rep_params()
        K3, B3 = self.conv1x1_sby.rep_params()
        K4, B4 = self.conv1x1_lpl.rep_params()
        RK, RB = (K0 + K1 + K2 + K3 + K4), (B0 + B1 + B2 + B3 + B4)
        if self.with_idt:
            K_idt = torch.zeros(self.out_planes, self.out_planes, 3, 3, dtype=RK.dtype)
            for i in range(self.out_planes):
                K_idt[i, i, 1, 1] = 1.0
            RK, RB = RK + K_idt, RB + 0.0
        return RK, RB


class ECBTrainingForm(ECB):
    """The same block whose eval-mode function is its training form (the five branches)."""

    def forward(self, x):
        y = self.conv3x3(x) + self.conv1x1_3x3(x) + self.conv1x1_sbx(x) + self.conv1x1_sby(x) + self.conv1x1_lpl(x)
        if self.with_idt:
            y += x
        return self.act(y)


class SizedParent(nn.Module):
    """A parent fx cannot trace (an `if` on a size): with example inputs, torch.export's graph."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        if x.shape[-1] > 1:
            x = x * 1.0
        return self.block(x)


ECB_FORMS = {"deploy": lambda: ECB(4, 4, 2, with_idt=True), "training": lambda: ECBTrainingForm(4, 4, 2, with_idt=True),
             "deploy-in-untraceable-parent": lambda: SizedParent(ECB(4, 4, 2, with_idt=True))}


@WITH_INPUTS
@pytest.mark.parametrize("form", list(ECB_FORMS))
def test_ecbsr_ecb_fuses_to_one_conv(form, with_inputs):
    """Five branches, identity and an eval mode that builds its kernel from parameters at every
    call (8 convs): one 3×3 conv then PReLU, with example inputs as without them."""
    model = seeded(ECB_FORMS[form]())
    x = x_(2, 4, 7, 9)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert ops(fused, x)[0] == 1, f"expected 1 conv, got {ops(fused, x)}\n{report}"
    assert report.after.convs == 1, str(report)


@pytest.mark.parametrize("seq_type", ["conv1x1-sobelx", "conv1x1-sobely", "conv1x1-laplacian"])
def test_ecbsr_edge_seqconv_fuses_alike_with_and_without_inputs(seq_type):
    """A 1×1 then a depthwise edge filter: one dense 3×3 conv costs more MACs, so it merges
    only with `max_macs_ratio=inf`; either way example inputs change nothing."""
    model = seeded(EdgeSeqConv3x3(seq_type, 4, 4))
    x = x_(2, 4, 7, 9)
    for ratio, want in ((1.0, 2), (math.inf, 1)):
        for with_inputs in (True, False):
            fused, report = fuse(model, x, with_inputs, max_macs_ratio=ratio)
            assert_same(model, fused, x, report)
            assert ops(fused, x)[0] == want == report.after.convs, f"ratio {ratio}: {ops(fused, x)}\n{report}"


# ---- squeeze-excite that pools with the input's size ----

class SEBlock(nn.Module):
    """RepVGG's SE: avg pool with kernel_size=inputs.size(3), 1×1 down, ReLU, 1×1 up, sigmoid."""

    def __init__(self, input_channels, internal_neurons):
        super().__init__()
        self.down = nn.Conv2d(input_channels, internal_neurons, 1, 1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, 1, 1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs):
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = self.down(x)
        x = F.relu(x)
        x = self.up(x)
        x = torch.sigmoid(x)
        x = x.view(-1, self.input_channels, 1, 1)
        return inputs * x


class SEBlockHW(SEBlock):
    """The same gate pooled over `[h, w]` read from `x.size()[2:]`."""

    def forward(self, x):
        h, w = x.size()[2:]
        s = F.avg_pool2d(x, [h, w])
        s = torch.sigmoid(self.up(F.relu(self.down(s))))
        return x * s


def se_net(se: type) -> nn.Module:
    """conv-BN-ReLU ×2, SE, conv-BN-ReLU, 1×1 head: four BNs, each right after a conv."""
    return nn.Sequential(OrderedDict(stem=conv_bn_relu(3, 8, inplace=False), block=conv_bn_relu(8, 8, inplace=False),
                                     se=se(8, 2), tail=conv_bn_relu(8, 8, inplace=False), head=nn.Conv2d(8, 3, 1)))


@WITH_INPUTS
@pytest.mark.parametrize("se, size", [(SEBlock, (8, 8)), (SEBlockHW, (8, 8)), (SEBlockHW, (7, 9))],
                         ids=["kernel_size=size(3)", "[h,w]-square", "[h,w]-7x9"])
def test_se_with_input_sized_pool_fuses_the_rest(se, size, with_inputs):
    model = seeded(se_net(se))
    x = x_(2, 3, *size)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    convs, bns = ops(fused, x)
    assert bns == 0, f"{bns} BNs left (every BN follows a conv)\n{report}"
    assert convs <= ops(model, x)[0]


# ---- RepVGG / MobileOne / ResNet with in-place activations and residual adds ----

class RepVGGBlock(nn.Module):
    """RepVGG's training-time block with nn.ReLU(inplace=True). `style`:
    reference: relu(dense(x) + 1x1(x) + id_out) (id_out = BN(x), or 0);
    iadd: out = dense(x); out += 1x1(x); out += BN(x);
    alias: identity = x (no BN); out = dense(x); out += 1x1(x); out += identity;
    alias_written: out = x; out += dense(x) — this writes the block's input."""

    def __init__(self, in_channels, out_channels, stride=1, groups=1, style="reference"):
        super().__init__()
        self.style = style
        self.nonlinearity = nn.ReLU(inplace=True)
        same = out_channels == in_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(in_channels) if same and style in ("reference", "iadd") else None
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups) if style != "alias_written" else None

    def forward(self, inputs):
        if self.style == "reference":
            id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
            return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)
        if self.style == "iadd":
            out = self.rbr_dense(inputs)
            out += self.rbr_1x1(inputs)
            if self.rbr_identity is not None:
                out += self.rbr_identity(inputs)
            return self.nonlinearity(out)
        if self.style == "alias":
            identity = inputs
            out = self.rbr_dense(inputs)
            out += self.rbr_1x1(inputs)
            out += identity
            return self.nonlinearity(out)
        out = inputs
        out += self.rbr_dense(inputs)
        return self.nonlinearity(out)


def repvgg_stage(style):
    if style in ("reference", "iadd"):
        blocks = [RepVGGBlock(4, 8, 2, style=style), RepVGGBlock(8, 8, style=style),
                  RepVGGBlock(8, 8, groups=2, style=style)]
    else:  # the identity needs in == out, stride 1
        blocks = [RepVGGBlock(8, 8, style=style), RepVGGBlock(8, 8, groups=4, style=style)]
    return nn.Sequential(*blocks), blocks[0].rbr_dense.conv.in_channels


@WITH_INPUTS
@pytest.mark.parametrize("style", ["reference", "iadd", "alias", "alias_written"])
def test_repvgg_inplace_relu_and_residual_styles(style, with_inputs):
    """One conv per block, no BN, and the same outputs (and input written the same way)."""
    stage, cin = repvgg_stage(style)
    model = seeded(stage)
    x = x_(2, cin, 9, 10)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert ops(fused, x) == (len(stage), 0), f"expected {len(stage)} convs and 0 BN, got {ops(fused, x)}\n{report}"


class MobileOneBlock(nn.Module):
    """MobileOne's training-time block: BN skip, 1×1 scale branch, k×k conv-BN branches in a
    ModuleList, `out = scale_out + identity_out; out += conv(x)` from the literal 0."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, num_conv_branches=2):
        super().__init__()
        self.num_conv_branches = num_conv_branches
        self.activation = nn.ReLU(inplace=True)
        self.rbr_skip = nn.BatchNorm2d(in_channels) if out_channels == in_channels and stride == 1 else None
        self.rbr_conv = nn.ModuleList([conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
                                       for _ in range(num_conv_branches)])
        self.rbr_scale = conv_bn(in_channels, out_channels, 1, stride, 0, groups) if kernel_size > 1 else None

    def forward(self, x):
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(out)


@WITH_INPUTS
def test_mobileone_stage_fuses_to_one_conv_per_block(with_inputs):
    """Depthwise 3×3 / pointwise 1×1 pairs (one strided, one widening): 4 convs, 0 BN."""
    stage = nn.Sequential(MobileOneBlock(6, 6, 3, 1, 1, groups=6), MobileOneBlock(6, 6, 1),
                          MobileOneBlock(6, 6, 3, 2, 1, groups=6), MobileOneBlock(6, 8, 1))
    model = seeded(stage)
    x = x_(2, 6, 9, 10)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert ops(fused, x) == (4, 0), f"expected 4 convs and 0 BN, got {ops(fused, x)}\n{report}"


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: identity = x; ...; out += identity; out = self.relu(out),
    with self.relu = nn.ReLU(inplace=True)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


@WITH_INPUTS
def test_resnet_basic_blocks_fold_every_bn(with_inputs):
    """stem conv-BN-ReLU, a plain block, a strided block with a 1×1 conv-BN downsample:
    6 convs (nothing else merges across the ReLUs and different inputs), 0 BN."""
    model = seeded(nn.Sequential(conv_bn_relu(3, 8), BasicBlock(8, 8),
                                 BasicBlock(8, 16, 2, downsample=conv_bn(8, 16, 1, 2))))
    x = x_(2, 3, 9, 10)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert ops(fused, x) == (6, 0), f"expected 6 convs and 0 BN, got {ops(fused, x)}\n{report}"


# ---- parents that iterate, index, or call methods of their children ----

class IteratesStages(nn.Module):
    """for i in range(len(self.blocks)): for m in self.blocks[i]: x = m(x), collecting the
    features after every element. `dynamic`: a shape test torch.fx cannot trace."""

    def __init__(self, dynamic):
        super().__init__()
        self.dynamic = dynamic
        self.blocks = nn.ModuleList([nn.Sequential(conv_bn_relu(3, 4), conv_bn_relu(4, 4)),
                                     nn.Sequential(conv_bn_relu(4, 8, 2), conv_bn_relu(8, 8))])

    def forward(self, x):
        features = []
        for i in range(len(self.blocks)):
            for m in self.blocks[i]:
                x = m(x)
                features.append(x)
            if self.dynamic and x.shape[-1] % 2 == 1:
                x = F.pad(x, (0, 1, 0, 1))
        return x, features


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.layer = nn.Sequential(conv_bn_relu(8, 8), conv_bn_relu(8, 8))

    def features(self, x):
        return self.layer(self.stem(x))

    def forward(self, x):
        return self.features(x).mean((2, 3))


class CallsChildMethod(nn.Module):
    """f = self.body.features(x), a method of the child's class, then a head."""

    def __init__(self, dynamic):
        super().__init__()
        self.dynamic = dynamic
        self.body = Body()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.body.features(x)
        if self.dynamic and f.shape[-1] > 1000:
            f = f * 0
        return self.head(f)


class IndexesHeads(nn.Module):
    """[self.heads[i](x) for i in range(len(self.heads))] over a ModuleList."""

    def __init__(self, dynamic):
        super().__init__()
        self.dynamic = dynamic
        self.stem = conv_bn_relu(3, 8)
        self.heads = nn.ModuleList([conv_bn(8, 2, 3, 1, 1) for _ in range(3)])

    def forward(self, x):
        x = self.stem(x)
        if self.dynamic and x.shape[-1] > 1000:
            x = x * 0
        return [self.heads[i](x) for i in range(len(self.heads))]


def _chain(seq, x):
    with torch.no_grad():
        for m in seq:
            x = m(x)
    return x


@WITH_INPUTS
@pytest.mark.parametrize("dynamic", [False, True], ids=["traceable", "shape-if"])
@pytest.mark.parametrize("kind", ["iterates", "method", "modulelist"])
def test_parent_uses_its_children_interfaces(kind, dynamic, with_inputs):
    model = seeded({"iterates": IteratesStages, "method": CallsChildMethod, "modulelist": IndexesHeads}[kind](dynamic))
    x = x_(2, 3, 9, 9)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    if kind == "iterates":
        for i in range(len(model.blocks)):
            pieces = list(iter(fused.blocks[i]))
            assert pieces and callable(fused.blocks[i][0])
        h = _chain(model.blocks[0], x)
        assert rel_error(h, _chain(fused.blocks[0], x)) <= TOL[x.dtype], "iterating fused.blocks[0] differs"
        assert rel_error(_chain(model.blocks[1], h), _chain(fused.blocks[1], h)) <= TOL[x.dtype]
    elif kind == "method":
        assert callable(getattr(fused.body, "features", None)), "fused.body.features is gone"
        with torch.no_grad():
            assert rel_error(model.body.features(x), fused.body.features(x)) <= TOL[x.dtype]
    else:
        assert len(fused.heads) == 3
        with torch.no_grad():
            h = model.stem(x)
            for i in range(3):
                assert rel_error(model.heads[i](h), fused.heads[i](h)) <= TOL[x.dtype], f"fused.heads[{i}] differs"


# ---- hooks ----

def _hooked(where: str, calls: list) -> nn.Module:
    model = seeded(nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8),
                                             relu=nn.ReLU(), conv2=nn.Conv2d(8, 4, 3, padding=1),
                                             bn2=nn.BatchNorm2d(4))))

    def doubles(module, args, output):
        calls.append(module)
        return output * 2

    def shifts(module, args):
        calls.append(module)
        return (args[0] + 1,)

    if where == "conv1":
        model.conv1.register_forward_hook(doubles)
    else:
        model.bn1.register_forward_pre_hook(shifts)
    return model


@WITH_INPUTS
@pytest.mark.parametrize("where", ["conv1", "bn1"], ids=["conv-forward-hook", "bn-pre-hook"])
def test_hooks_keep_firing_or_their_module_is_left_alone(where, with_inputs):
    calls = []
    model = _hooked(where, calls)
    x = x_(2, 3, 7, 8)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    calls.clear()
    with torch.no_grad():
        fused(x.clone())
    left_alone = [s for s in report.skipped if "has hooks" in s.reason and s.path.split(":")[0] == where]
    assert calls or left_alone, f"the hook on {where} no longer fires and the report does not say 'has hooks'\n{report}"


# ---- weights and flags the fused model must keep ----

@WITH_INPUTS
def test_legacy_weight_norm_conv_then_bn(with_inputs):
    """torch.nn.utils.weight_norm recomputes `weight` from weight_g, weight_v in a pre-hook."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm is deprecated in favour of parametrizations
        conv = torch.nn.utils.weight_norm(nn.Conv2d(3, 8, 3, padding=1))
    model = seeded(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU()))
    x = x_(2, 3, 7, 8)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert ops(fused, x) == (1, 0), f"expected 1 conv and 0 BN, got {ops(fused, x)}\n{report}"


def _executed_convs(model, x) -> list[nn.Module]:
    """The conv modules one forward calls, in order."""
    seen, hooks = [], []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            hooks.append(m.register_forward_hook(lambda mod, args, out: seen.append(mod)))
    try:
        with torch.no_grad():
            model(x.clone())
    finally:
        for h in hooks:
            h.remove()
    return seen


@WITH_INPUTS
def test_frozen_conv_keeps_requires_grad_false(with_inputs):
    """Frozen conv-BN, ReLU, trainable conv-BN: the fused convs' weights keep [False, True]."""
    model = seeded(nn.Sequential(conv_bn(3, 8, 3, 1, 1), nn.ReLU(), conv_bn(8, 4, 3, 1, 1)))
    model[0].requires_grad_(False)
    x = x_(2, 3, 7, 8)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert [c.weight.requires_grad for c in _executed_convs(model, x)] == [False, True]
    flags = [c.weight.requires_grad for c in _executed_convs(fused, x)]
    assert flags == [False, True], f"the fused convs' weights have requires_grad {flags}\n{report}"


@WITH_INPUTS
def test_channels_last_weights_stay_channels_last(with_inputs):
    model = seeded(nn.Sequential(conv_bn(4, 8, 3, 1, 1), nn.ReLU(), conv_bn(8, 8, 3, 1, 1)))
    model = model.to(memory_format=torch.channels_last)
    x = x_(2, 4, 7, 8).contiguous(memory_format=torch.channels_last)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _executed_convs(model, x))
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    weights = [(n, p) for n, p in fused.named_parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert weights
    bad = [n for n, p in weights if not p.is_contiguous(memory_format=torch.channels_last)]
    assert not bad, f"weights no longer channels_last: {bad}"


class ViewAfterMergedSum(nn.Module):
    """A channels-last-strided value (a Linear between movedims) feeds conv+BN branches, one
    through `.contiguous()`; the sum is contiguous and `.view` flattens it. The merged conv reads
    the channels-last value and is channels-last: `view` must still work on it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.a, self.b = conv_bn(3, 4, 3, 1, 1), conv_bn(3, 4, 1, 1, 0)

    def forward(self, x):
        x = self.fc(x.movedim(1, -1)).movedim(-1, 1)
        y = self.b(x.contiguous()) + self.a(x)
        return y.view(y.shape[0], -1)


@WITH_INPUTS
def test_view_of_a_merged_value_of_another_memory_format(with_inputs):
    model, x = seeded(ViewAfterMergedSum()), x_(2, 3, 5, 7)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    assert reparam.count(fused, (x,)).convs == 2, str(report)  # the Linear and one conv


def _qat_model():
    qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    conv = torch.ao.nn.qat.Conv2d(3, 8, 3, padding=1, bias=False, qconfig=qconfig)
    model = seeded(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU()))
    with torch.no_grad():
        model(x_(2, 3, 7, 8, seed=5))  # calibrate the weight observer once
    model.apply(torch.ao.quantization.disable_observer)  # then the eval function is fixed
    return model


@WITH_INPUTS
def test_qat_conv_keeps_its_fake_quant(with_inputs):
    model = _qat_model()
    x = x_(2, 3, 7, 8)
    with torch.no_grad():  # the expectation tells the two apart: a plain conv-BN differs
        plain = F.relu(model[1](F.conv2d(x, model[0].weight, None, 1, 1)))
    assert rel_error(model(x.clone()), plain) > 1e-4
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)


class PlusOneConv(nn.Conv2d):
    """A conv subclass whose forward adds 1."""

    def forward(self, input):
        return super().forward(input) + 1


@WITH_INPUTS
def test_conv_subclass_with_its_own_forward(with_inputs):
    model = seeded(nn.Sequential(PlusOneConv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    x = x_(2, 3, 7, 8)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)


# ---- clear errors ----

def _one_line_error(excinfo, *words):
    message = str(excinfo.value).strip()
    assert message, "empty error message"
    assert "\n" not in message, f"the error is not one line:\n{message}"
    assert any(re.search(w, message, re.IGNORECASE) for w in words), f"the error does not say {words}: {message}"


def test_uninitialized_lazy_module_without_example_inputs():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises((TypeError, ValueError)) as e:
        reparam.fuse(model)
    _one_line_error(e, "lazy", "uninitiali[sz]ed")


@WITH_INPUTS
def test_script_module(with_inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        model = torch.jit.script(seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    x = x_(2, 3, 7, 8)
    with pytest.raises((TypeError, ValueError)) as e:
        reparam.fuse(model, (x,) if with_inputs else None)
    _one_line_error(e, "script")


@pytest.mark.parametrize("ratio", [math.nan, "1", None, -1, 0], ids=["nan", "str", "None", "-1", "0"])
def test_max_macs_ratio_must_be_a_positive_number(ratio):
    model = seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises((TypeError, ValueError)) as e:
        reparam.fuse(model, max_macs_ratio=ratio)
    _one_line_error(e, "max_macs_ratio")


# ---- the meta device ----

class RepVGGMeta(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.block = RepVGGBlock(8, 8)

    def forward(self, x):
        return self.block(self.stem(x))


@WITH_INPUTS
def test_meta_device_model_fuses_its_structure(with_inputs):
    """Built on `meta`: nothing can be computed, the structure still fuses (3 convs → 2)."""
    with torch.device("meta"):
        model = RepVGGMeta().eval()
    x = torch.empty(2, 3, 8, 8, device="meta")
    fused = reparam.fuse(model, (x,) if with_inputs else None)
    count = lambda m: sum(isinstance(c, nn.modules.conv._ConvNd) for c in m.modules())
    assert count(fused) < count(model), f"{count(fused)} conv modules, the original has {count(model)}"
    not_meta = [n for n, t in [*fused.named_parameters(), *fused.named_buffers()] if not t.is_meta]
    assert not not_meta, f"tensors off the meta device: {not_meta}"


# ---- a model that writes its input ----

class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x.sub_(0.5)
        return self.bn(self.conv(x))


@WITH_INPUTS
def test_model_that_writes_its_input(with_inputs):
    """fuse leaves the caller's tensor alone; the fused model returns the same and writes its
    input as the original does (x - 0.5)."""
    model = seeded(WritesItsInput())
    x = x_(2, 3, 7, 8)
    caller = x.clone()
    fused, report = reparam.fuse_with_report(model, (caller,) if with_inputs else None)
    assert torch.equal(caller, x), f"fuse changed the caller's tensor (max change {(caller - x).abs().max():.3g})"
    assert_same(model, fused, x, report)
    original, fused_input = x.clone(), x.clone()
    with torch.no_grad():
        model(original)
        fused(fused_input)
    assert torch.allclose(original, x - 0.5) and torch.equal(original, fused_input)


# ---- torch.export's own checks are no readers: peft LoRA on a torchvision ResNet-18 ----

def test_peft_lora_resnet_folds_every_bn_with_example_inputs():
    """peft's LoRA forwards (`*args, **kwargs`, a loop over adapters) need torch.export; its graph's
    `_assert_tensor_metadata` nodes read each conv's output without using it, and must not keep
    the BN after it unfolded. As many BNs left as merging the adapters first (none)."""
    peft = pytest.importorskip("peft")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = peft.get_peft_model(torchvision.models.resnet18(num_classes=10),
                                peft.LoraConfig(r=4, target_modules=["conv1", "conv2"]))
    model = seeded(model)  # every weight random: LoRA's B (zero at first) too
    x = x_(1, 3, 64, 64)
    fused, report = fuse(model, x, True)
    assert_same(model, fused, x, report)
    merged = reparam.fuse(model.merge_and_unload(), (x.clone(),))
    assert ops(fused, x)[1] <= ops(merged, x)[1] == 0, f"{ops(fused, x)} vs merged {ops(merged, x)}\n{report}"


# ---- torch's own layers are leaves, at the root too ----

class ValueIf(nn.Module):
    """A parent no tracer takes (an `if` on a value) around a conv and a BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


@WITH_INPUTS
@pytest.mark.parametrize("make, shape", [(lambda: nn.BatchNorm1d(4), (3, 4)), (ValueIf, (2, 4, 5))],
                         ids=["root", "child-of-untraceable"])
def test_torch_norm_layer_is_a_leaf_not_untraced(make, shape, with_inputs):
    """BatchNorm1d's `_check_input_dim` refuses a tracer's Proxy: traced as a root it failed and
    was reported untraced; it is one of torch's layers, with nothing inside to merge."""
    model, x = seeded(make()), x_(*shape)
    fused, report = fuse(model, x, with_inputs)
    assert_same(model, fused, x, report)
    paths = [u.path for u in report.untraced]  # ValueIf itself is untraceable, its BN is not
    assert "bn" not in paths and (make is ValueIf or not paths), str(report)


# ---- a parameter with a traced size: timm ViT's `self.cls_token.expand(B, -1, -1)` ----

class TinyViT(nn.Module):
    """Patch embedding (conv, BN), a class token expanded to the batch read from the input,
    position embedding, a Linear head on the class token: timm's `_pos_embed` idiom."""

    def __init__(self, dim=8):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.norm(self.patch(x)).flatten(2).transpose(1, 2)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        return self.head(x[:, 0])


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1)


@pytest.mark.parametrize("make", [TinyViT, _timm_vit], ids=["tiny", "timm"])
def test_parameter_expanded_to_a_traced_size_is_traced(make):
    """With parameters concrete, `param.expand(proxy, -1, -1)` raises (a real tensor takes no Proxy
    size); plain fx traces it, and so must `fuse`: parameters as proxies when concrete fails."""
    model, x = seeded(make()), x_(2, 3, 8, 8) if make is TinyViT else x_(2, 3, 16, 16)
    fused, report = fuse(model, x, False)
    assert_same(model, fused, x, report)
    assert not report.untraced, str(report)
    if make is TinyViT:
        assert ops(fused, x) == (2, 0), f"conv→BN folded: {ops(fused, x)}\n{report}"


# ---- a forward that assigns its own attribute (SPAN's `self.mean = self.mean.type_as(x)`) ----

class MeanShift(nn.Module):
    """SPAN's input normalization: a plain tensor attribute (no buffer) cast in forward."""

    def __init__(self):
        super().__init__()
        self.mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        self.mean = self.mean.type_as(x)
        return self.bn(self.conv((x - self.mean) * 2.0))


@WITH_INPUTS
def test_forward_that_assigns_its_own_attribute(with_inputs):
    """Tracing runs forward with proxies: the assignment left a Proxy in the model (and its copy),
    and the fused model failed on its first call (or graph lint raised). Tracing leaves every
    module as it was."""
    model, x = seeded(MeanShift()), x_(2, 3, 7, 9)
    mean = model.mean
    fused, report = fuse(model, x, with_inputs)
    assert model.mean is mean
    assert not any(isinstance(v, torch.fx.Proxy) for m in fused.modules() for v in vars(m).values())
    assert_same(model, fused, x, report)
    assert ops(fused, x) == (1, 0), f"{ops(fused, x)}\n{report}"
