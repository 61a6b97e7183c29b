"""GCNet's building blocks, training form only.

The deploy form (each GCBlock as one 3×3 conv + ReLU, every conv-BN folded) is not written here:
it is `reparam.fuse(model.eval())`. Attribute names follow the paper (`Path3x3_1x1`,
`Path1x1_1x1`, `residual`); `gcnet.checkpoint` maps the release's names onto them.
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBN(nn.Sequential):
    """conv (no bias) → BN (→ ReLU): the release's ConvModule in its default order.

    (N, C_in, H, W) → (N, C_out, ⌈H / stride⌉, ⌈W / stride⌉) for odd kernels, padding k // 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 act: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        if act:
            self.act = nn.ReLU()


class BNReLUConv(nn.Sequential):
    """BN → ReLU → conv (no bias): the release's ConvModule with order ('norm', 'act', 'conv').

    The BN normalizes the INPUT (C_in channels); the ReLU between BN and conv keeps the two apart,
    so nothing here folds. (N, C_in, H, W) → (N, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2, bias=False)


class _Path(nn.Sequential):
    """k×k conv-BN (stride s) → 1×1 conv-BN, no activation in between.

    (N, C_in, H, W) → (N, C_out, H / s, W / s)."""
    kernel_size: int

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = ConvBN(in_channels, out_channels, self.kernel_size, stride)
        self.conv2 = ConvBN(out_channels, out_channels, 1)


class Path3x3_1x1(_Path):
    """3×3 conv-BN (stride s, pad 1) → 1×1 conv-BN."""
    kernel_size = 3


class Path1x1_1x1(_Path):
    """1×1 conv-BN (stride s) → 1×1 conv-BN. The stride sits on the FIRST 1×1, as in the release."""
    kernel_size = 1


class GCBlock(nn.Module):
    """out = act(Σ_n Path3x3_1x1_n(x) + Path1x1_1x1(x) [+ BN(x)]), the paper's Figure 3.

    The residual BN exists only when the shapes allow it (C_in == C_out and stride 1).
    `act=False` for the last block of each branch stage: the network applies ReLU later.
    (N, C_in, H, W) → (N, C_out, H / stride, W / stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, n_paths: int = 2,
                 act: bool = True):
        super().__init__()
        if n_paths < 1:
            raise ValueError(f"GCBlock needs at least one Path3x3_1x1, got n_paths={n_paths}")
        self.paths_3x3 = nn.ModuleList(Path3x3_1x1(in_channels, out_channels, stride) for _ in range(n_paths))
        self.path_1x1 = Path1x1_1x1(in_channels, out_channels, stride)
        self.residual = (nn.BatchNorm2d(out_channels)
                         if in_channels == out_channels and stride == 1 else None)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.path_1x1(x)
        for path in self.paths_3x3:
            out = out + path(x)
        if self.residual is not None:
            out = out + self.residual(x)
        return self.act(out)
