"""Diverse Branch Block (Ding et al., 2021), training form, and the six transforms of its paper.

Branches of `DiverseBranchBlock`, summed, then the activation:
  * k×k conv-BN                                              (I conv-BN, II branch addition)
  * 1×1 conv-BN                                               (VI multi-scale kernels)
  * 1×1 conv → BNAndPad → AvgPool k×k → BN                    (V average pooling)
  * 1×1 conv → BNAndPad → k×k conv (no padding) → BN          (III sequential 1×1 → k×k)
`DepthConcat` shows transform IV: parallel k×k conv-BN branches concatenated along channels.

BNAndPad pads the BN's output with BN(0) instead of zero, which is what makes "1×1 then k×k"
equal to one padded k×k conv at the border too."""
from __future__ import annotations

import torch
from torch import nn

from reparam.nn import BNAndPad

from .repvgg import conv_bn


class DiverseBranchBlock(nn.Module):
    """(N, C_in, H, W) → (N, C_out, H/s, W/s). `internal_channels` is the width of the 1×1 → k×k
    branch (C_in by default); it must be divisible by `groups`.

    With groups == C_in == C_out (depthwise) the pooling branch has no 1×1 conv, as in DBB."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, internal_channels: int | None = None,
                 act: type[nn.Module] = nn.ReLU):
        super().__init__()
        p = kernel_size // 2
        internal = internal_channels or in_channels
        self.origin = conv_bn(in_channels, out_channels, kernel_size, stride, p, groups)
        self.one = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        if groups == in_channels == out_channels:
            self.avg = nn.Sequential(nn.AvgPool2d(kernel_size, stride, p), nn.BatchNorm2d(out_channels))
        else:
            self.avg = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False),
                BNAndPad(out_channels, padding=p),
                nn.AvgPool2d(kernel_size, stride, 0),
                nn.BatchNorm2d(out_channels))
        self.one_kxk = nn.Sequential(
            nn.Conv2d(in_channels, internal, 1, groups=groups, bias=False),
            BNAndPad(internal, padding=p),
            nn.Conv2d(internal, out_channels, kernel_size, stride, 0, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels))
        self.act = act()

    def forward(self, x):
        return self.act(self.origin(x) + self.one(x) + self.avg(x) + self.one_kxk(x))


class DepthConcat(nn.Module):
    """cat([BN_i(conv_k×k,i(x)) for three branches], channels), then the activation.

    (N, C_in, H, W) → (N, C_out, H/s, W/s). C_out, a multiple of `groups`, is split into up to
    three widths, multiples of `groups`, as evenly as possible. Transform IV: one k×k conv, exactly and at the same cost, for groups=1;
    with groups > 1 the merged conv would be dense (branch i's group j and branch i+1's group j
    read the same input group but land apart), so `reparam` leaves the concatenation alone."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        units = out_channels // groups
        widths = [groups * (units // 3 + (i < units % 3)) for i in range(3)]
        self.branches = nn.ModuleList(
            conv_bn(in_channels, w, kernel_size, stride, kernel_size // 2, groups) for w in widths if w)
        self.act = act()

    def forward(self, x):
        return self.act(torch.cat([branch(x) for branch in self.branches], dim=1))
