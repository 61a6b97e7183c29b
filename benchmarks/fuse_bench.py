"""Fusion time and latency before/after for one model.

    python benchmarks/fuse_bench.py torchvision.models:resnet50 --input-shape 1,3,224,224
    python benchmarks/fuse_bench.py gcnet:gcnet_s --input-shape 1,3,512,1024 --device cuda

Prints medians over repeated runs (warm-up first): the time `reparam.fuse` takes, and the
forward latency of the original (eval mode) and fused models."""
from __future__ import annotations

import argparse
import time
from statistics import median

import torch

import reparam
from reparam.bench import compare
from reparam.cli import DTYPES, _shape, load_factory


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--fuse-repeats", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed forwards at least")
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_factory(args.factory)().to(args.device, DTYPES[args.dtype]).eval()
    x = torch.randn(args.input_shape, device=args.device, dtype=DTYPES[args.dtype])
    fuse_times = []
    for _ in range(args.fuse_repeats):  # fusion alone, without the report's counting forwards
        t0 = time.perf_counter()
        reparam.fuse(model)
        fuse_times.append(time.perf_counter() - t0)
    cmp = compare(model, (x,), repeats=args.repeats, min_time=args.min_time)
    print(f"{args.factory}  input {tuple(x.shape)} {args.dtype} on {args.device}")
    print(cmp.table())
    print(f"fusion time: median {median(fuse_times):.3f} s over {len(fuse_times)} runs")
    print(f"speed-up: {cmp.latency_before[0] / cmp.latency_after[0]:.3f}×  "
          f"max relative error: {cmp.report.max_rel_error:.3g}")


if __name__ == "__main__":
    main()
