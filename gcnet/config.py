"""GCNet-S/M/L as frozen configs: the numbers of GCNET.md's network table."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GCNetConfig:
    """One GCNet variant. Stage numbering follows the paper (stage 1 is the stem)."""
    channels: int                           # C, the base width; the stem outputs C at H/4
    stage_blocks: tuple[int, int]           # GCBlocks in stages 2 and 3 (shared trunk)
    semantic_blocks: tuple[int, int, int]   # stages 4, 5, 6 of the semantic branch
    detail_blocks: tuple[int, int, int]     # stages 4, 5, 6 of the detail branch
    head_channels: int                      # hidden width of the main and auxiliary heads
    ppm_channels: int = 128                 # P, DAPPM's branch width (128 for all three)
    n_paths: int = 2                        # N Path3x3_1x1 per GCBlock (the release hard-codes 2; N_PATHS_HELP)
    num_classes: int = 19                   # Cityscapes trainIds
    in_channels: int = 3

    def __post_init__(self):
        if min(self.stage_blocks + self.semantic_blocks + self.detail_blocks) < 1:
            raise ValueError(f"too few blocks per stage: {self}")
        if self.n_paths < 1:
            raise ValueError(f"n_paths must be at least 1, got {self.n_paths}")


GCNET_S = GCNetConfig(channels=32, stage_blocks=(4, 4), semantic_blocks=(5, 5, 2),
                      detail_blocks=(4, 4, 2), head_channels=64)
GCNET_M = GCNetConfig(channels=64, stage_blocks=(4, 4), semantic_blocks=(5, 5, 2),
                      detail_blocks=(4, 4, 2), head_channels=128)
GCNET_L = GCNetConfig(channels=64, stage_blocks=(5, 5), semantic_blocks=(5, 5, 3),
                      detail_blocks=(5, 5, 3), head_channels=256)

CONFIGS = {"s": GCNET_S, "m": GCNET_M, "l": GCNET_L}

# Which N reaches which Cityscapes val mIoU for GCNet-S (the --n-paths help of info, bench, train).
N_PATHS_HELP = ("Path3x3_1x1 per GCBlock (default 2). GCNet-S on Cityscapes: N=2: the release's config and "
                "weights, 76.9 mIoU; N=3: its README's 77.3 (no config, no weights); N=4: the paper's text "
                "for S (M, L: 2)")
