"""GCNet (CVPR 2025), training form, readable beside GCNET.md's network table.

    stem (H/4) → stage 2 → stage 3 (H/8) ─┬─ semantic 4 ─ fuse ─ semantic 5 ─ fuse ─ semantic 6 ─ DAPPM ─┐
                                          └─ detail 4   ─ fuse ─ detail 5   ─ fuse ─ detail 6  ─────────(+)→ head
                                                           └→ auxiliary head (training only)

Deploy form: `reparam.fuse(model.eval())` turns every GCBlock into one 3×3 conv + ReLU and
folds every conv→BN; nothing in this package rewrites the model by hand.
The forward is traceable by `torch.fx.symbolic_trace` (sizes flow as `x.shape[2:]`, no
shape-dependent branches), so the whole network fuses as one graph.
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BNReLUConv, ConvBN, GCBlock
from .config import GCNET_L, GCNET_M, GCNET_S, GCNetConfig


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize to `size` (a shape slice such as `y.shape[2:]`), align_corners=False."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def gc_stage(in_channels: int, out_channels: int, n_blocks: int, stride: int, n_paths: int,
             last_act: bool = True) -> nn.Sequential:
    """`n_blocks` GCBlocks; the first changes width and stride, the last has ReLU iff `last_act`."""
    blocks = [GCBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1,
                      n_paths, act=last_act or i < n_blocks - 1) for i in range(n_blocks)]
    return nn.Sequential(*blocks)


class BilateralFusion(nn.Module):
    """Exchange between the branches after stages 4 and 5, as the release computes it.

    semantic (N, S, h, w), detail (N, D, H, W) with H = 2^k h; s = ReLU(semantic), d = ReLU(detail) →
        s + down(d), d + upsample(compress(s)).
    The sums read the RECTIFIED branches: the release's `ReLU(inplace=True)` overwrites the
    branch tensors before it adds to them (GCNET.md, CAUTION); written out here, no aliasing.
    `down` is k stride-2 3×3 conv-BNs (D → S), ReLU between them (2D → 4D → ... → S)."""

    def __init__(self, semantic_channels: int, detail_channels: int, n_down: int):
        super().__init__()
        self.compress = ConvBN(semantic_channels, detail_channels, 1)
        widths = [detail_channels * 2 ** i for i in range(n_down)] + [semantic_channels]
        self.down = nn.Sequential(*(ConvBN(widths[i], widths[i + 1], 3, stride=2, act=i < n_down - 1)
                                    for i in range(n_down)))

    def forward(self, semantic: torch.Tensor, detail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        semantic, detail = F.relu(semantic), F.relu(detail)
        comp = self.compress(semantic)
        return semantic + self.down(detail), detail + resize(comp, detail.shape[2:])


class DAPPM(nn.Module):
    """Deep Aggregation Pyramid Pooling Module (DDRNet), every conv in BN-ReLU-conv order.

    Scales: identity, avgpool k5 s2, k9 s4, k17 s8, global; each → BN-ReLU-1×1 (C_in → P).
    Scales 2..5 are upsampled, added to the previous scale's output and refined by a
    BN-ReLU-3×3 (P → P); concat(5P) → BN-ReLU-1×1 → C_out, plus a BN-ReLU-1×1 shortcut.
    (N, C_in, h, w) → (N, C_out, h, w). Pools count padding (count_include_pad=True), as mmseg."""

    def __init__(self, in_channels: int, branch_channels: int, out_channels: int,
                 kernel_sizes=(5, 9, 17), strides=(2, 4, 8)):
        super().__init__()
        pools = [nn.AvgPool2d(k, s, k // 2) for k, s in zip(kernel_sizes, strides)] + [nn.AdaptiveAvgPool2d(1)]
        self.scales = nn.ModuleList([BNReLUConv(in_channels, branch_channels, 1)])
        self.scales.extend(nn.Sequential(pool, BNReLUConv(in_channels, branch_channels, 1)) for pool in pools)
        self.processes = nn.ModuleList(BNReLUConv(branch_channels, branch_channels, 3) for _ in pools)
        self.compression = BNReLUConv(branch_channels * len(self.scales), out_channels, 1)
        self.shortcut = BNReLUConv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.scales[0](x)]
        for scale, process in zip(self.scales[1:], self.processes):
            feats.append(process(resize(scale(x), x.shape[2:]) + feats[-1]))
        return self.compression(torch.cat(feats, dim=1)) + self.shortcut(x)


class SegHead(nn.Sequential):
    """BN → ReLU → 3×3 conv-BN-ReLU → 1×1 conv (with bias). (N, C_in, h, w) → (N, classes, h, w)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU()
        self.conv = ConvBN(in_channels, channels, 3, act=True)
        self.cls = nn.Conv2d(channels, num_classes, 1)


class GCNet(nn.Module):
    """GCNet. Input (N, 3, H, W) with H, W multiples of 64 for exact pyramid sizes.

    Training mode: (main logits, auxiliary logits), both (N, classes, H/8, W/8).
    Eval mode: logits (N, classes, H, W), bilinearly upsampled; (N, classes, H/8, W/8)
    with `upsample_logits=False`."""

    def __init__(self, config: GCNetConfig = GCNET_S, *, upsample_logits: bool = True):
        super().__init__()
        self.config = config
        self.upsample_logits = upsample_logits
        C, n = config.channels, config.n_paths
        sem, det = config.semantic_blocks, config.detail_blocks

        self.stem = nn.Sequential(ConvBN(config.in_channels, C, 3, stride=2, act=True),
                                  ConvBN(C, C, 3, stride=2, act=True))                 # H/4
        self.stage2 = gc_stage(C, C, config.stage_blocks[0], 1, n)
        self.stage3 = gc_stage(C, 2 * C, config.stage_blocks[1], 2, n)                  # H/8
        self.semantic = nn.ModuleList([gc_stage(2 * C, 4 * C, sem[0], 2, n, last_act=False),   # H/16
                                       gc_stage(4 * C, 8 * C, sem[1], 2, n, last_act=False),   # H/32
                                       gc_stage(8 * C, 16 * C, sem[2], 2, n, last_act=False)])  # H/64
        self.detail = nn.ModuleList([gc_stage(2 * C, 2 * C, det[0], 1, n, last_act=False),     # H/8
                                     gc_stage(2 * C, 2 * C, det[1], 1, n, last_act=False),
                                     gc_stage(2 * C, 4 * C, det[2], 1, n, last_act=False)])
        self.fusion4 = BilateralFusion(4 * C, 2 * C, n_down=1)
        self.fusion5 = BilateralFusion(8 * C, 2 * C, n_down=2)
        self.dappm = DAPPM(16 * C, config.ppm_channels, 4 * C)
        self.head = SegHead(4 * C, config.head_channels, config.num_classes)
        self.aux_head = SegHead(2 * C, config.head_channels, config.num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor):
        size = x.shape[2:]
        x = self.stage3(self.stage2(self.stem(x)))                       # stages 1-3, H/8
        s, d = self.fusion4(self.semantic[0](x), self.detail[0](x))      # stage 4
        aux = d  # the detail branch after the first fusion (the release clones it here)
        s, d = self.semantic[1](F.relu(s)), self.detail[1](F.relu(d))    # stage 5: ReLU of the sums
        s, d = self.fusion5(s, d)
        s, d = self.semantic[2](F.relu(s)), self.detail[2](F.relu(d))    # stage 6
        logits = self.head(d + resize(self.dappm(s), d.shape[2:]))
        if self.training:
            return logits, self.aux_head(aux)
        return resize(logits, size) if self.upsample_logits else logits


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _build(preset: GCNetConfig, num_classes: int, n_paths: int, upsample_logits: bool, overrides) -> GCNet:
    known = {f.name for f in fields(GCNetConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown GCNet option(s) {sorted(unknown)}; config fields are {sorted(known)}")
    config = replace(preset, num_classes=num_classes, n_paths=n_paths, **overrides)
    return GCNet(config, upsample_logits=upsample_logits)


def gcnet_s(num_classes: int = 19, n_paths: int = 2, *, upsample_logits: bool = True, **overrides) -> GCNet:
    """GCNet-S (C=32, head 64). n_paths: the release's config and weights are N=2 (76.9 mIoU on
    Cityscapes val); its README reports 77.3 for "GCNet-S (N=3)" (no config, no weights); the
    paper's text says N=4 for S."""
    return _build(GCNET_S, num_classes, n_paths, upsample_logits, overrides)


def gcnet_m(num_classes: int = 19, n_paths: int = 2, *, upsample_logits: bool = True, **overrides) -> GCNet:
    """GCNet-M (C=64, head 128)."""
    return _build(GCNET_M, num_classes, n_paths, upsample_logits, overrides)


def gcnet_l(num_classes: int = 19, n_paths: int = 2, *, upsample_logits: bool = True, **overrides) -> GCNet:
    """GCNet-L (C=64, deeper stages, head 256)."""
    return _build(GCNET_L, num_classes, n_paths, upsample_logits, overrides)


FACTORIES = {"s": gcnet_s, "m": gcnet_m, "l": gcnet_l}
