"""RepVGG (Ding et al., 2021), training form: k×k conv-BN + 1×1 conv-BN + identity BN, summed.

The deploy form is `reparam.fuse(block.eval())`: one k×k conv followed by the activation."""
from __future__ import annotations

from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel_size, stride: int = 1, padding=0,
            groups: int = 1) -> nn.Sequential:
    """Bias-free conv followed by BatchNorm, the branch every block here is built from."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels))


class RepVGGBlock(nn.Module):
    """act(BN(conv_k×k(x)) + BN(conv_1×1(x)) + BN(x)); (N, C_in, H, W) → (N, C_out, H/s, W/s).

    The identity branch exists only where it can: C_in == C_out and stride 1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv_kxk = conv_bn(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups)
        self.conv_1x1 = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.act = act()

    def forward(self, x):
        y = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)
