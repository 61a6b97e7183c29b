"""`gcnet info`: parameters and multiply-accumulates of the training and deploy forms.

GFLOPs in the paper's Table 3 are multiply-accumulates of the DEPLOY form at 1024×2048;
we count them as torch.utils.flop_counter's FLOPs / 2 (`reparam.count`), on meta tensors so
that no 100-GMAC forward runs on the CPU.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

import reparam
from reparam.progress import Progress
from reparam.report import stats_table

from .config import N_PATHS_HELP
from .model import FACTORIES

# Table 3 (params, GMACs at 1024×2048) and what the structure in GCNET.md counts exactly
PAPER = {"s": (9.2e6, 45.2), "m": (34.2e6, 178.0), "l": (45.2e6, 232.0)}
EXPECTED_DEPLOY = {"s": (9.17e6, 45.1), "m": (34.05e6, 178.4), "l": (44.86e6, 231.6)}


@dataclass(frozen=True)
class Info:
    variant: str
    n_paths: int
    size: tuple[int, int]
    training: reparam.Stats  # params include the auxiliary head; ops are one eval-mode forward
    deploy: reparam.Stats    # reparam.fuse(model.eval()): the auxiliary head is gone

    def table(self) -> str:
        extra = None
        if self.size == (1024, 2048):
            params, gmacs = PAPER[self.variant]
            extra = {"paper (Table 3)": ["", f"{params / 1e6:.1f} M / {gmacs:g}"]}
        head = f"GCNet-{self.variant.upper()}, n_paths={self.n_paths}, input 1×3×{self.size[0]}×{self.size[1]}"
        return head + "\n" + stats_table({"training": self.training, "deploy": self.deploy}, extra)


def count_on_meta(model: nn.Module, size: tuple[int, int]) -> reparam.Stats:
    """`reparam.count` of one forward at batch 1 and `size`, without computing anything."""
    model = copy.deepcopy(model).to("meta")
    return reparam.count(model, (torch.empty(1, 3, *size, device="meta"),))


def model_info(variant: str = "s", size: tuple[int, int] = (1024, 2048), n_paths: int = 2) -> Info:
    model = FACTORIES[variant](n_paths=n_paths).eval()
    deploy = reparam.fuse(model)
    return Info(variant, n_paths, tuple(size), count_on_meta(model, size), count_on_meta(deploy, size))


def _command(args) -> int:
    progress = Progress("gcnet", quiet=args.quiet)
    for variant in args.variant:
        progress.step(f"building and fusing GCNet-{variant.upper()}, counting both forms on meta tensors")
        print(model_info(variant, tuple(args.size), args.n_paths).table(), end="\n\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameters and GMACs of the training and deploy forms")
    p.add_argument("--variant", nargs="+", choices=sorted(FACTORIES), default=["s"])
    p.add_argument("--size", nargs=2, type=int, default=[1024, 2048], metavar=("H", "W"))
    p.add_argument("--n-paths", type=int, default=2, help=N_PATHS_HELP)
    p.set_defaults(func=_command)
