"""MobileOne (Vasu et al., 2023), training form of one block: `num_conv_branches` parallel k×k
conv-BN branches (over-parameterization), a 1×1 conv-BN "scale" branch and an identity BN.

With groups == channels it is MobileOne's depthwise block; with kernel_size 1 its pointwise one."""
from __future__ import annotations

from torch import nn

from .repvgg import conv_bn


class MobileOneBlock(nn.Module):
    """act(Σ_i BN_i(conv_k×k,i(x)) + BN(conv_1×1(x)) + BN(x)); (N, C_in, H, W) → (N, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, num_conv_branches: int = 2, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv_kxk = nn.ModuleList(
            conv_bn(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups)
            for _ in range(num_conv_branches))
        self.scale = conv_bn(in_channels, out_channels, 1, stride, 0, groups) if kernel_size > 1 else None
        self.identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.act = act()

    def forward(self, x):
        y = sum(branch(x) for branch in self.conv_kxk)
        if self.scale is not None:
            y = y + self.scale(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)
