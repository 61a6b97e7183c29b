"""`gcnet bench`: frames per second at batch 1 of three forms of one GCNet.

- training: the training-form network run in eval mode (every branch and BN executed);
- release:  what the release times: each GCBlock converted by its own formulas, then every
            conv→BN pair fused (`gcnet._release.release_timed_form`);
- fused:    our deploy form, `reparam.fuse(model.eval())`.
Each figure is 1 / median latency over `repeats` runs after `warmup` runs (CUDA synchronised),
with the spread (max - min latency) reported beside it. Weights are random: speed does not
depend on their values.
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import reparam
from reparam.stats import latency

from ._release import release_timed_form
from .model import FACTORIES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMS = ("training", "release", "fused")


@dataclass(frozen=True)
class Timing:
    form: str
    size: tuple[int, int]
    median_s: float
    spread_s: float

    @property
    def fps(self) -> float:
        return 1.0 / self.median_s


def build_forms(variant: str = "s", n_paths: int = 2) -> dict[str, nn.Module]:
    model = FACTORIES[variant](n_paths=n_paths).eval()
    return {"training": model, "release": release_timed_form(model), "fused": reparam.fuse(model)}


def bench(variant: str = "s", sizes=((512, 1024), (1024, 2048)), *, device: str = "cpu",
          dtype: str = "float32", channels_last: bool = False, compile: bool = False,
          warmup: int = 3, repeats: int = 10, min_time: float = 0.0, n_paths: int = 2,
          forms=FORMS) -> list[Timing]:
    """Latency of each form at each (H, W), batch 1."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {}
    for name, model in build_forms(variant, n_paths).items():
        if name in forms:
            model = model.to(device=device, dtype=DTYPES[dtype], memory_format=fmt)
            models[name] = torch.compile(model) if compile else model
    timings = []
    for size in sizes:
        x = torch.randn(1, 3, *size, device=device, dtype=DTYPES[dtype]).to(memory_format=fmt)
        for name, model in models.items():
            median, spread = latency(model, (x,), warmup=warmup, repeats=repeats, min_time=min_time)
            timings.append(Timing(name, tuple(size), median, spread))
    return timings


def table(timings: list[Timing]) -> str:
    """One row per size: FPS (± spread) of each form and the speed-up ratios."""
    by_size: dict[tuple, dict[str, Timing]] = {}
    for t in timings:
        by_size.setdefault(t.size, {})[t.form] = t
    forms = [f for f in FORMS if any(f in row for row in by_size.values())]
    ratios = [(a, b) for a, b in (("release", "training"), ("fused", "training"), ("fused", "release"))
              if a in forms and b in forms]
    head = ["size"] + [f"{f} FPS" for f in forms] + [f"{a}/{b}" for a, b in ratios]
    rows = []
    for size, row in by_size.items():
        fps = [f"{row[f].fps:.2f} (±{_fps_spread(row[f]):.2f})" for f in forms]
        rows.append([f"{size[0]}×{size[1]}"] + fps + [f"{row[a].fps / row[b].fps:.2f}×" for a, b in ratios])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def _fps_spread(t: Timing) -> float:
    """FPS range implied by the latency spread around the median."""
    fast, slow = max(t.median_s - t.spread_s / 2, 1e-9), t.median_s + t.spread_s / 2
    return 1 / fast - 1 / slow


def write_csv(timings: list[Timing], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["form", "height", "width", "median_ms", "spread_ms", "fps"])
        for t in timings:
            w.writerow([t.form, *t.size, f"{t.median_s * 1e3:.3f}", f"{t.spread_s * 1e3:.3f}", f"{t.fps:.3f}"])
    return path


def plot(timings: list[Timing], path, title: str = "") -> Path:
    """FPS against resolution (pixels), one line per form, error bars from the spread."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for form in FORMS:
        ts = sorted((t for t in timings if t.form == form), key=lambda t: t.size[0] * t.size[1])
        if ts:
            ax.errorbar([t.size[0] * t.size[1] / 1e6 for t in ts], [t.fps for t in ts],
                        yerr=[_fps_spread(t) / 2 for t in ts], marker="o", capsize=3, label=form)
    ax.set_xlabel("resolution (megapixels, H×W)")
    ax.set_ylabel("FPS (batch 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.lower().split("x", 1)) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated HxW like 512x1024,1024x2048, got '{text}'")


def _command(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes
    timings = bench(args.variant, sizes, device=args.device, dtype=args.dtype,
                    channels_last=args.channels_last, compile=args.compile, warmup=args.warmup,
                    repeats=args.repeats, min_time=args.min_time, n_paths=args.n_paths)
    title = (f"GCNet-{args.variant.upper()} on {args.device}, {args.dtype}"
             + (", channels-last" if args.channels_last else "") + (", compiled" if args.compile else ""))
    print(title + f", {torch.get_num_threads()} CPU thread(s), batch 1, "
          f"median of {args.repeats} runs after {args.warmup} warm-up")
    print(table(timings))
    if args.out is not None or len(sizes) > 1:
        stem = Path(args.out or "runs/gcnet_bench") / f"gcnet_{args.variant}_{args.device}_{args.dtype}"
        print(f"wrote {write_csv(timings, stem.with_suffix('.csv'))} and {plot(timings, stem.with_suffix('.png'), title)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="FPS of the training, release-timed and fused forms")
    p.add_argument("--variant", choices=sorted(FACTORIES), default="s")
    p.add_argument("--sizes", type=_sizes, default=[(1024, 2048)], help="comma-separated HxW, e.g. 512x1024,1024x2048")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each form (warm-up compiles)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-time", type=float, default=0.0, help="run each form at least this many seconds")
    p.add_argument("--n-paths", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a busy machine 1 thread can be far faster than several)")
    p.add_argument("--out", default=None, help="folder for the CSV and PNG (default runs/gcnet_bench "
                                               "when several sizes are given)")
    p.set_defaults(func=_command)
