"""OREPA (Hu et al., 2022), training form: the branches are linear in the *weights*, so the block
builds one k×k kernel from its parameters inside `forward` and runs a single `F.conv2d`, then BN.

Kernel branches, each scaled per output channel by a learned vector (linear scaling, no BN):
  * a k×k kernel
  * a 1×1 kernel, zero-padded to k×k
  * a 1×1 kernel times the k×k average (avg pooling as a kernel)
  * a 1×1 kernel composed with a k×k kernel (the sequential 1×1 → k×k branch, per group)
With C_in == C_out and stride 1 an identity branch `x * gamma` (per channel, no BN) is added
after the BN. `reparam` folds the parameter-only kernel computation into a constant."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OREPABlock(nn.Module):
    """act(BN(conv(x, W(θ))) + γ·x); (N, C_in, H, W) → (N, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1,
                 kernel_size: int = 3, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.stride, self.groups, self.kernel_size = stride, groups, kernel_size
        k, cin = kernel_size, in_channels // groups
        self.w_origin = nn.Parameter(torch.randn(out_channels, cin, k, k) / (cin * k * k) ** 0.5)
        self.w_1x1 = nn.Parameter(torch.randn(out_channels, cin, 1, 1) / cin ** 0.5)
        self.w_avg = nn.Parameter(torch.randn(out_channels, cin, 1, 1) / cin ** 0.5)
        self.w_pre = nn.Parameter(torch.eye(cin).repeat(groups, 1) + 0.1 * torch.randn(in_channels, cin))
        self.w_kxk = nn.Parameter(torch.randn(out_channels, cin, k, k) / (cin * k * k) ** 0.5)
        self.branch_scale = nn.Parameter(torch.rand(4, out_channels) + 0.5)
        self.bn = nn.BatchNorm2d(out_channels)
        self.gamma = (nn.Parameter(torch.rand(out_channels) + 0.5)
                      if in_channels == out_channels and stride == 1 else None)
        self.act = act()

    def weight(self) -> torch.Tensor:
        """The equivalent k×k kernel, (C_out, C_in / groups, k, k)."""
        k, g = self.kernel_size, self.groups
        out, cin = self.w_origin.shape[:2]
        one = F.pad(self.w_1x1, [k // 2] * 4)
        avg = self.w_avg.expand(-1, -1, k, k) / (k * k)
        # (1×1 then k×k) within each group: W[o, c] = Σ_m kxk[o, m] · pre[group(o)·cin + m, c]
        pre = self.w_pre.view(g, cin, cin)
        kxk = self.w_kxk.view(g, out // g, cin, k, k)
        seq = torch.einsum("gomhw,gmc->gochw", kxk, pre).reshape(out, cin, k, k)
        s = self.branch_scale.view(4, -1, 1, 1, 1)
        return s[0] * self.w_origin + s[1] * one + s[2] * avg + s[3] * seq

    def forward(self, x):
        y = self.bn(F.conv2d(x, self.weight(), None, self.stride, self.kernel_size // 2, 1, self.groups))
        if self.gamma is not None:
            y = y + x * self.gamma.view(1, -1, 1, 1)
        return self.act(y)
