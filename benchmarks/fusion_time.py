"""Fusion time of `reparam.fuse` against each library's own converter, without and with example
inputs: best and median of --repeats runs, in one process on one thread, the share the self-check
(`reparam.check.verify`) takes, the converter's best time and the ratio of the best times.

    python benchmarks/fusion_time.py --repeats 6
    python benchmarks/fusion_time.py --models yolov8n smp-fpn-repvgg_a0 --repeats 3

Models (random weights and BN statistics; nothing is downloaded) and their converters:
  gcnet_s 1×3×256×512        the release's GCBlock deploy form (`gcnet._release.release_deploy`)
  repvgg_a0, mobileone_s0    timm's `reparameterize_model` (1×3×224×224)
  yolov8n 1×3×320×320        Ultralytics' `model.fuse()` (see benchmarks/reach.py)
  smp-fpn-repvgg_a0 1×3×256×256   timm's `reparameterize_model` on the smp model
Both sides deep-copy the model (reparam.fuse copies it; each converter is given a copy). To
compare with another checkout of reparam, run the script with that checkout first on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import time
from pathlib import Path
from statistics import median

import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.append(str(Path(__file__).resolve().parents[1]))  # `examples`, `benchmarks` (PYTHONPATH wins)


def _gcnet():
    from examples.blocks import randomize_norms
    from gcnet import gcnet_s
    from gcnet._release import release_deploy
    torch.manual_seed(0)
    return randomize_norms(gcnet_s(), 0).eval(), torch.randn(1, 3, 256, 512), release_deploy


def _timm(name):
    def make():
        from benchmarks.vs_timm import build, timm_deploy
        model, _ = build(name, {})
        return model, torch.randn(1, 3, 224, 224), lambda m: timm_deploy(copy.deepcopy(m))
    return make


def _reach(name, size=320):
    def make():
        from benchmarks.reach import build
        model, x, convert = build(name, size)
        return model, x, lambda m: convert(m) if name.startswith("yolo") else convert(copy.deepcopy(m))
    return make


MODELS = {"gcnet_s": _gcnet, "repvgg_a0": _timm("repvgg_a0"), "mobileone_s0": _timm("mobileone_s0"),
          "yolov8n": _reach("yolov8n"), "smp-fpn-repvgg_a0": _reach("smp-fpn-repvgg_a0")}


def _times(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import reparam
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
    print(f"reparam from {reparam.__file__}; one thread; best and median of {args.repeats} runs")
    print(f"{'model':<18} {'inputs':<7} {'best s':>7} {'median s':>9} {'self-check':>11} "
          f"{'converter s':>12} {'ratio':>7}")
    for name in args.models:
        model, x, convert = MODELS[name]()
        with torch.no_grad():
            theirs = min(_times(lambda: convert(model), args.repeats))
        for mode in ("none", "given"):
            checks = []

            def run():
                spent[0] = 0.0
                t0 = time.perf_counter()
                reparam.fuse(model, (x,) if mode == "given" else None)
                checks.append(spent[0] / (time.perf_counter() - t0))
            times = _times(run, args.repeats)
            share = f"{median(checks):10.0%}" if check is not None else "         -"
            print(f"{name:<18} {mode:<7} {min(times):7.3f} {median(times):9.3f} {share:>11} "
                  f"{theirs:12.3f} {min(times) / theirs:6.1f}×", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
