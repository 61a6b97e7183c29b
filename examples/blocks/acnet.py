"""ACNet (Ding et al., 2019), training form: k×k, 1×k and k×1 conv-BN branches, summed.

The asymmetric kernels sit on the centre row and column of the square one, so the three
collapse into one k×k conv (each padded per axis, not to a square)."""
from __future__ import annotations

from torch import nn

from .repvgg import conv_bn


class ACBlock(nn.Module):
    """act(BN(conv_k×k(x)) + BN(conv_1×k(x)) + BN(conv_k×1(x))); (N, C_in, H, W) → (N, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        p = kernel_size // 2
        self.square = conv_bn(in_channels, out_channels, kernel_size, stride, p, groups)
        self.hor = conv_bn(in_channels, out_channels, (1, kernel_size), stride, (0, p), groups)
        self.ver = conv_bn(in_channels, out_channels, (kernel_size, 1), stride, (p, 0), groups)
        self.act = act()

    def forward(self, x):
        return self.act(self.square(x) + self.hor(x) + self.ver(x))
