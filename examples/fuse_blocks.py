"""Fuse each training-form block of examples/blocks and show what is left: one conv and its
activation.

    python examples/fuse_blocks.py              # a summary line per block and configuration
    python examples/fuse_blocks.py -v           # plus each block's full report and fused graph
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import reparam  # noqa: E402
from examples.blocks import BLOCKS, randomize_norms  # noqa: E402

# (in_channels, out_channels, stride, groups)
CONFIGS = [(16, 16, 1, 1), (16, 32, 2, 4), (16, 16, 1, 16)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{'block':<20} {'in→out':>7} {'s':>2} {'g':>3}   convs/BNs before → after   max rel error")
    for name, cls in BLOCKS.items():
        for cin, cout, stride, groups in CONFIGS:
            block = randomize_norms(cls(cin, cout, stride=stride, groups=groups)).eval()
            x = torch.randn(2, cin, 28, 28)
            fused, report = reparam.fuse_with_report(block, (x,))
            b, a = report.before, report.after
            print(f"{name:<20} {cin:>3}→{cout:<3} {stride:>2} {groups:>3}   "
                  f"{b.convs:>5}/{b.bns:<3} → {a.convs}/{a.bns:<10}   {report.max_rel_error:.1e}")
            if args.verbose:
                print(report, "\n", fused.code, sep="")


if __name__ == "__main__":
    main()
