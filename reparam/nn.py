"""Layers that express re-parameterizable structure exactly, and that `reparam` understands."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
