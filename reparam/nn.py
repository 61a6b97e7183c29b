"""Layers that express re-parameterizable structure exactly, and that `reparam` understands."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import algebra


class BNAndPad(nn.BatchNorm2d):
    """BatchNorm2d whose output is padded with the BN's value of a zero input (DBB's BNAndPadLayer).

    In eval mode that equals BN of the zero-padded input, so 1×1 conv → BNAndPad → unpadded k×k
    conv is exactly one padded k×k conv (DBB's transform III, border included). Statistics are
    those of the unpadded input, as in DBB. (N, C, H, W) → (N, C, H + 2p, W + 2p)."""

    def __init__(self, num_features: int, padding: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.padding = padding

    def border_value(self) -> torch.Tensor:
        """BN(0) per channel, shape (C,): what the border is filled with."""
        var = self.running_var if self.running_var is not None else torch.ones_like(self.bias)
        mean = self.running_mean if self.running_mean is not None else torch.zeros_like(self.bias)
        weight = self.weight if self.affine else torch.ones_like(mean)
        bias = self.bias if self.affine else torch.zeros_like(mean)
        return bias - mean * weight / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.padding == 0:
            return y
        v = self.border_value().view(1, -1, 1, 1)
        return F.pad(y - v, [self.padding] * 4) + v


class ChannelAffine(nn.Module):
    """y = x · weight + bias per channel: what a merge of BatchNorms, scales and identity branches
    without any convolution computes (a conv would cost more). Channels are dim 1 for `nd`
    spatial dims, the last dim for nd == 0. With `padding`, the output is zero-padded by that
    much per spatial side before the bias is added, so the border holds the bias (as a padded
    1×1 depthwise conv gives). (N, C, *S) → (N, C, *(S + 2·padding))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, nd: int, padding: tuple = ()):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.nd, self.padding = nd, tuple(padding) or (0,) * nd

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, nd={self.nd}" + (f", padding={self.padding}" if any(self.padding) else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (-1,) + (1,) * self.nd
        y = x * self.weight.view(view)
        if any(self.padding):
            y = F.pad(y, [p for p in reversed(self.padding) for _ in (0, 1)])
        return y if self.bias is None else y + self.bias.view(view)

    def spec(self):
        """What the compiler sees: `algebra.Affine` (unpadded), else the padded 1×1 depthwise conv."""
        scale = self.weight.detach().double()
        shift = None if self.bias is None else self.bias.detach().double()
        if not any(self.padding):
            return algebra.Affine(scale, shift, self.nd)
        one = algebra.as_conv(algebra.Affine(scale, shift), scale.numel(), self.nd)
        return algebra.ConvSpec(one.weight, one.bias, one.stride, self.padding, one.dilation, one.groups)
