"""Fusion time and latency before/after for one model.

    python benchmarks/fuse_bench.py torchvision:resnet50 --threads 4
    python benchmarks/fuse_bench.py timm:repvgg_a0 --kwargs num_classes=10,pretrained=False
    python benchmarks/fuse_bench.py gcnet:gcnet_s --input-shape 1,3,512,1024 --device cuda

MODEL is spelt as for `reparam report` (timm:NAME, torchvision:NAME, PACKAGE.MODULE:FACTORY).
Prints the median time `reparam.fuse` takes over --fuse-repeats runs, and the forward latency of
the original (eval mode) and fused models: medians (interquartile range) of interleaved passes,
the speed-up as the median of the per-pair ratios."""
from __future__ import annotations

import argparse
import sys
import time
from statistics import median

import torch

import reparam
from reparam.bench import compare
from reparam.cli import OneLineParser, add_model_arguments, model_and_input, run
from reparam.progress import Progress


def bench(args) -> int:
    progress = Progress("fuse_bench", quiet=args.quiet)
    model, x = model_and_input(args, progress)
    fuse_times = []
    for _ in progress.bar(range(args.fuse_repeats), desc="fusing"):  # fusion alone, without the counting forwards
        t0 = time.perf_counter()
        reparam.fuse(model)
        fuse_times.append(time.perf_counter() - t0)
    cmp = compare(model, (x,), repeats=args.repeats, min_time=args.min_time, progress=progress)
    print(f"{args.model}  input {tuple(x.shape)} {args.dtype} on {x.device}, {torch.get_num_threads()} CPU thread(s)")
    print(cmp.table())
    print(f"fusion time: median {median(fuse_times):.3f} s over {len(fuse_times)} runs")
    print(f"speed-up: {cmp.speedup:.3f}×  max relative error: {cmp.report.max_rel_error:.3g}")
    print(f"({cmp.timing_note()})")
    return 0


def main(argv=None) -> int:
    p = OneLineParser(prog="fuse_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--fuse-repeats", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed passes per form, interleaved (at least)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed forwards at least")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    return run("fuse_bench", bench, args)


if __name__ == "__main__":
    sys.exit(main())
