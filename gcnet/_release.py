"""The release's own deploy conversion, written out for ONE GCBlock. Not the deploy path.

Two uses only:
1. test oracle: the paper's formulas (fold each BN into its conv, compose the 3×3 with the
   1×1 of each Path3x3_1x1, pad the composed 1×1 of Path1x1_1x1 to 3×3, the residual BN as a
   3×3 identity kernel, sum) cross-check what `reparam.fuse` computes without knowing GCNet;
2. the "release timed form" of `gcnet bench`, what the release's speed script times: each GCBlock
   converted this way, then its order-based conv-BN fuser (`fold_by_registration_order` for the
   pairs only it folds, torch.fx's `fuse` for the true conv→BN pairs).
Our deploy form is `reparam.fuse(model.eval())`. Arithmetic in float32, like the release.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

from .blocks import BNReLUConv, GCBlock


def fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv weight (O, I, k, k) followed by eval BN → (weight * γ/σ, β - μγ/σ)."""
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return weight * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def compose(k1: torch.Tensor, b1: torch.Tensor, k2: torch.Tensor, b2: torch.Tensor):
    """(k1, b1) then the 1×1 (k2, b2): kernel (O, I, k, k) = k2 · k1, bias k2 · b1 + b2."""
    w2 = k2[:, :, 0, 0]
    return torch.einsum("om,mikl->oikl", w2, k1), w2 @ b1 + b2


def _path(path) -> tuple[torch.Tensor, torch.Tensor]:
    return compose(*fold_bn(path.conv1.conv.weight, path.conv1.bn),
                   *fold_bn(path.conv2.conv.weight, path.conv2.bn))


def gcblock_kernel_bias(block: GCBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The deploy 3×3 kernel (C_out, C_in, 3, 3) and bias (C_out,) of an eval-mode GCBlock."""
    kernel, bias = 0, 0
    for path in block.paths_3x3:
        k, b = _path(path)
        kernel, bias = kernel + k, bias + b
    k, b = _path(block.path_1x1)
    kernel, bias = kernel + F.pad(k, [1, 1, 1, 1]), bias + b
    if block.residual is not None:
        c = block.residual.num_features
        identity = torch.zeros(c, c, 3, 3, dtype=k.dtype, device=k.device)
        identity[torch.arange(c), torch.arange(c), 1, 1] = 1
        k, b = fold_bn(identity, block.residual)
        kernel, bias = kernel + k, bias + b
    return kernel, bias


class DeployGCBlock(nn.Module):
    """The release's deploy GCBlock: `reparam_3x3` (3×3, stride s, pad 1, bias) → ReLU or identity."""

    def __init__(self, block: GCBlock):
        super().__init__()
        conv1 = block.paths_3x3[0].conv1.conv
        self.reparam_3x3 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, conv1.stride, 1, bias=True)
        with torch.no_grad():
            kernel, bias = gcblock_kernel_bias(block)
            self.reparam_3x3.weight.copy_(kernel)
            self.reparam_3x3.bias.copy_(bias)
        self.act = block.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.reparam_3x3(x))


@torch.no_grad()
def release_deploy(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval) with every GCBlock replaced by its `DeployGCBlock`; conv-BNs kept."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, GCBlock):
                setattr(module, child_name, DeployGCBlock(child))
    return model


@torch.no_grad()
def fold_by_registration_order(model: nn.Module) -> nn.Module:
    """The release's fuser pairs each BN with the conv registered just before it, and mmcv's
    ConvModule registers `conv` before `bn` whatever its order. In DAPPM's BN → ReLU → conv
    modules the BN reads the conv's INPUT; where the channel counts let it (the 4 P → P process
    convs) the fuser folds that BN into the conv as if it followed it: ReLU → conv' instead of
    BN → ReLU → conv, another function. Done in place on `model`'s BNReLUConvs."""
    for module in model.modules():
        if isinstance(module, BNReLUConv) and module.bn.num_features == module.conv.out_channels:
            conv = module.conv
            weight, bias = fold_bn(conv.weight, module.bn)
            module.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                    conv.padding, bias=True)
            module.conv.weight.copy_(weight)
            module.conv.bias.copy_(bias)
            module.bn = nn.Identity()
    return model


def release_timed_form(model: nn.Module) -> nn.Module:
    """What the release's speed script times: GCBlocks converted, its order-based fuser's DAPPM
    folds, every conv→BN pair fused (torch.fx `fuse`). GCNet-S: 50 convs, 8 BNs; NOT exact."""
    return fx_fuse(fold_by_registration_order(release_deploy(model)))
