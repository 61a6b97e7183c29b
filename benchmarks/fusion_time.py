"""Fusion time of GCNet-S (1×3×256×512) and timm repvgg_a0 (1×3×224×224), without and with
example inputs: best and median of --repeats runs on one thread, and the share the self-check
(`reparam.check.verify`) takes. To compare with another checkout of reparam, run the script with
that checkout first on PYTHONPATH.

    python benchmarks/fusion_time.py --repeats 6
"""
from __future__ import annotations

import argparse
import importlib
import time
from statistics import median

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import timm
    import reparam
    from gcnet import gcnet_s
    try:
        check = importlib.import_module("reparam.check")
    except ImportError:  # a checkout from before the self-check
        check = None
    spent = [0.0]
    if check is not None:
        verify = check.verify

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return verify(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
        check.verify = timed
    print(f"reparam from {reparam.__file__}")
    models = {"gcnet_s": (gcnet_s(), (1, 3, 256, 512)),
              "repvgg_a0": (timm.create_model("repvgg_a0", pretrained=False), (1, 3, 224, 224))}
    print(f"{'model':<10} {'inputs':<7} {'best s':>7} {'median s':>9} {'self-check':>11}")
    for name, (model, shape) in models.items():
        model.eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for mode in ("none", "given"):
            times, checks = [], []
            for _ in range(args.repeats):
                spent[0] = 0.0
                t0 = time.perf_counter()
                reparam.fuse(model, (x,) if mode == "given" else None)
                times.append(time.perf_counter() - t0)
                checks.append(spent[0] / times[-1])
            share = f"{median(checks):10.0%}" if check is not None else "         -"
            print(f"{name:<10} {mode:<7} {min(times):7.3f} {median(times):9.3f} {share:>11}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
