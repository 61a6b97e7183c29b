"""YOLOv6's re-parameterizable blocks, training form. Its `RepVGGBlock` is RepVGG's
(`examples.blocks.repvgg.RepVGGBlock`); the quantization-aware variants move the BNs:

  * `QARepVGGBlock` (QARepVGG, Chu et al., 2023): act(BN(BN(conv_k×k(x)) + conv_1×1(x) + x))
    — the 1×1 branch has no BN, the identity has none, and one BN follows the sum.
  * `QARepVGGBlockV2` (YOLOv6 3.0): as above plus an AvgPool k×k branch (no BN).

Registration order puts the post-sum BN next to the 1×1 conv: matching by dataflow, not by
module order, is what keeps a fuser correct here."""
from __future__ import annotations

from torch import nn

from .repvgg import conv_bn


class QARepVGGBlock(nn.Module):
    """(N, C_in, H, W) → (N, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, act: type[nn.Module] = nn.ReLU, avg: bool = False):
        super().__init__()
        p = kernel_size // 2
        self.dense = conv_bn(in_channels, out_channels, kernel_size, stride, p, groups)
        self.conv_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        same = in_channels == out_channels and stride == 1
        self.identity = nn.Identity() if same else None
        self.avg = nn.AvgPool2d(kernel_size, stride, p) if avg and same else None
        self.act = act()

    def forward(self, x):
        y = self.dense(x) + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        if self.avg is not None:
            y = y + self.avg(x)
        return self.act(self.bn(y))


class QARepVGGBlockV2(QARepVGGBlock):
    """QARepVGGBlock with the AvgPool branch (where C_in == C_out and stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, act: type[nn.Module] = nn.ReLU):
        super().__init__(in_channels, out_channels, stride, groups, kernel_size, act, avg=True)
