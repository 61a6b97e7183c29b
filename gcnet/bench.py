"""`gcnet bench`: frames per second at batch 1, under one of two timing protocols.

Protocols (the output names the one it prints):
- ours:    each pass timed on its own, synchronised after it (`reparam.stats.latency`), `repeats`
           passes after `warmup`: FPS = 1 / median latency, the range shown is the interquartile
           range of the latencies.
- release: what the release's speed script measures: fp32, `cudnn.benchmark=True`, 10 warm-up
           passes, then as many back-to-back passes as fill `seconds` (the count calibrated by
           doubling), ONE synchronisation at each end: FPS = passes / elapsed, the mean over
           `builds` fresh builds of the model (the range: the slowest and fastest build).
Forms:
- fused:    our deploy form, `reparam.fuse(model.eval())`: the training form's function, exactly;
- training: the training form in eval mode (every branch and BN executed);
- release:  the model the release's speed script times (`gcnet._release.release_timed_form`):
            `switch_to_deploy()` and its order-based conv-BN fuser, which also folds the 4 BNs
            before DAPPM's P → P process convs into those convs as if they followed them (GCNet-S:
            50 convs, 8 BNs, where the exact form keeps 11). ANOTHER function: `release_form_error`
            measures how far it is from the exact model, and the output prints it.
Settings (columns): fp32, fp16, bf16, channels-last (fp32), compile (fp32, `torch.compile`).
Weights are random: speed does not depend on their values. Both protocols run under no_grad,
with `cudnn.benchmark=True` on CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import reparam
from reparam.progress import QUIET, Progress
from reparam.stats import latency

from reparam.testing import rel_error

from ._release import release_timed_form
from .config import N_PATHS_HELP
from .errors import require
from .model import FACTORIES

FORMS = ("fused", "training", "release")
SETTINGS = {  # name: (dtype, channels_last, compile)
    "fp32": (torch.float32, False, False), "fp16": (torch.float16, False, False),
    "bf16": (torch.bfloat16, False, False), "channels-last": (torch.float32, True, False),
    "compile": (torch.float32, False, True)}
PROTOCOLS = {
    "ours": "{warmup} warm-up passes, then per-pass timing, synchronised after each pass: FPS = 1 / median "
            "latency (interquartile range)",
    "release": "the release's speed script (its own runs: fp32): {warmup} warm-up passes, back-to-back passes over "
               "{seconds:g} s with one synchronisation at each end, FPS = passes / time, mean of {builds} builds "
               "(slowest-fastest)",
}


@dataclass(frozen=True)
class Timing:
    protocol: str
    form: str
    setting: str
    size: tuple[int, int]
    fps: float        # nan when the setting failed on this device (see `error`)
    fps_low: float    # ours: 1 / third-quartile latency; release: the slowest build
    fps_high: float   # ours: 1 / first-quartile latency; release: the fastest build
    error: str = ""


def build_form(form: str, variant: str = "s", n_paths: int = 2) -> nn.Module:
    """A fresh eval-mode GCNet in `form` (a key of FORMS), random weights."""
    model = FACTORIES[variant](n_paths=n_paths).eval()
    return {"training": lambda: model, "fused": lambda: reparam.fuse(model),
            "release": lambda: release_timed_form(model)}[form]()


@torch.no_grad()
def release_form_error(variant: str = "s", n_paths: int = 2, size=(64, 128), seed: int = 0) -> float:
    """Relative error (max |Δ| / max |exact|) of the release's timed form against the exact model,
    on random weights with random BN statistics (at initialisation every BN is close to the
    identity, where the misplaced folds change almost nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the same weights on every call, the caller's RNG untouched
        torch.manual_seed(seed)
        model = FACTORIES[variant](n_paths=n_paths).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        n = bn.num_features
        for tensor, low in ((bn.running_mean, -0.5), (bn.running_var, 0.5), (bn.weight, 0.5), (bn.bias, -0.5)):
            tensor.copy_(torch.rand(n, generator=g) + low)
    x = torch.randn(1, 3, *size, generator=g)
    return rel_error(model(x), release_timed_form(model)(x))


def release_note(error: float) -> str:
    return (f"release = as the release times it — not exact, rel err {error:.2f} against the exact model (random "
            f"BN statistics): its fuser folds the BNs before DAPPM's 4 process convs as if they followed them")


def prepare(model: nn.Module, setting: str, device, compile_backend: str = "inductor") -> nn.Module:
    dtype, channels_last, compiled = SETTINGS[setting]
    model = model.to(device=device, dtype=dtype,
                     memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.compile(model, backend=compile_backend) if compiled else model


def example(size, setting: str, device) -> torch.Tensor:
    dtype, channels_last, _ = SETTINGS[setting]
    x = torch.randn(1, 3, *size, device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _cudnn_benchmark():
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@torch.no_grad()
def throughput(model: nn.Module, x: torch.Tensor, *, warmup: int = 10, seconds: float = 6.0) -> float:
    """The release's measurement of one build: with cudnn.benchmark, `warmup` passes, then FPS of
    back-to-back passes, synchronised only at both ends of the timed run; the pass count is
    first calibrated by doubling (≥ 1 s, or `seconds` when shorter) so the run lasts `seconds`."""
    def run(n: int) -> float:
        _synchronize(x.device)
        start = time.perf_counter()
        for _ in range(n):
            model(x)
        _synchronize(x.device)
        return time.perf_counter() - start

    with _cudnn_benchmark():
        for _ in range(warmup):
            model(x)
        n, elapsed = 1, run(1)
        while elapsed < min(1.0, seconds):
            n *= 2
            elapsed = run(n)
        n = max(1, round(n / elapsed * seconds))
        return n / run(n)


def _measure(protocol: str, form: str, setting: str, size, *, variant, n_paths, device, warmup, repeats,
             min_time, seconds, builds, compile_backend) -> Timing:
    def build():
        return prepare(build_form(form, variant, n_paths), setting, device, compile_backend)

    x = example(size, setting, device)
    if protocol == "release":
        fps = [throughput(build(), x, warmup=warmup, seconds=seconds) for _ in range(builds)]
        return Timing(protocol, form, setting, tuple(size), statistics.mean(fps), min(fps), max(fps))
    model = build()
    latency(model, (x,), warmup=warmup, repeats=1)
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        times.append(latency(model, (x,), warmup=0, repeats=1)[0])  # one synchronised pass
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return Timing(protocol, form, setting, tuple(size), 1 / med, 1 / q3, 1 / q1)


def bench(variant: str = "s", sizes=((1024, 2048),), *, protocol: str = "ours", forms=("fused", "training"),
          settings=("fp32",), device: str = "cpu", warmup: int = 10, repeats: int = 10, min_time: float = 0.0,
          seconds: float = 6.0, builds: int = 3, n_paths: int = 2, compile_backend: str = "inductor",
          progress: Progress = QUIET) -> list[Timing]:
    """One Timing per (size, form, setting) under `protocol` ("ours" or "release"). A setting
    that fails on this device (fp16 kernels missing, no compiler for torch.compile) gives a
    Timing with fps = nan and the error's first line, instead of stopping the others."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS)}")
    timings = []
    with _cudnn_benchmark():
        for size in sizes:
            for form in forms:
                for setting in settings:
                    progress.step(f"timing {form} {setting} at {size[0]}×{size[1]} ({protocol} protocol)")
                    try:
                        timings.append(_measure(protocol, form, setting, size, variant=variant, n_paths=n_paths,
                                                device=device, warmup=warmup, repeats=repeats, min_time=min_time,
                                                seconds=seconds, builds=builds, compile_backend=compile_backend))
                    except Exception as e:  # noqa: BLE001 -- reported in the table, the sweep goes on
                        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                        nan = float("nan")
                        timings.append(Timing(protocol, form, setting, tuple(size), nan, nan, nan,
                                              f"{type(e).__name__}: {first}"))
    return timings


def table(timings: list[Timing], notes=()) -> str:
    """Rows: size × form; columns: settings; cells: FPS (low-high); then `notes`, one a line."""
    settings = list(dict.fromkeys(t.setting for t in timings))
    cells = {(t.size, t.form, t.setting): t for t in timings}
    rows = []
    for size, form in dict.fromkeys((t.size, t.form) for t in timings):
        row = [f"{size[0]}×{size[1]}", form]
        for setting in settings:
            t = cells.get((size, form, setting))
            row.append("" if t is None else "n/a" if t.error else f"{t.fps:.2f} ({t.fps_low:.2f}-{t.fps_high:.2f})")
        rows.append(row)
    spread = "IQR" if timings and timings[0].protocol == "ours" else "builds min-max"
    head = ["size", "form"] + [f"{s} FPS ({spread})" for s in settings]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    notes = [*notes, *sorted({f"n/a {t.setting}: {t.error}" for t in timings if t.error})]
    return "\n".join(lines + notes)


def write_csv(timings: list[Timing], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["protocol", "form", "setting", "height", "width", "fps", "fps_low", "fps_high", "error"])
        for t in timings:
            w.writerow([t.protocol, t.form, t.setting, *t.size, f"{t.fps:.3f}", f"{t.fps_low:.3f}",
                        f"{t.fps_high:.3f}", t.error])
    return path


def plot(timings: list[Timing], path, title: str = "") -> Path:
    """FPS against resolution (megapixels), one line per form and setting, bars low-high."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for form, setting in dict.fromkeys((t.form, t.setting) for t in timings if not t.error):
        ts = sorted((t for t in timings if (t.form, t.setting) == (form, setting) and not t.error),
                    key=lambda t: t.size[0] * t.size[1])
        low = [max(0.0, t.fps_low) for t in ts]  # a spread never reaches below 0 FPS
        ax.errorbar([t.size[0] * t.size[1] / 1e6 for t in ts], [t.fps for t in ts],
                    yerr=[[t.fps - lo for t, lo in zip(ts, low)], [t.fps_high - t.fps for t in ts]],
                    marker="o", capsize=3, label=f"{form} {setting}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("resolution (megapixels, H×W)")
    ax.set_ylabel("FPS (batch 1; bars: " + ("interquartile range" if timings and timings[0].protocol == "ours"
                                           else "slowest-fastest build") + ")")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sizes(text: str) -> list[tuple[int, int]]:
    """'512x1024,1024x2048' → [(512, 1024), (1024, 2048)]; anything else is refused."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected sizes as HEIGHTxWIDTH, comma-separated (512x1024 or "
                                             f"512x1024,1024x2048), got '{text}'")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def _count(least: int):
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, got '{text}'")
        return int(text)
    return parse


def _command(args) -> int:
    if args.out is not None or len(args.sizes) > 1:  # before any work: say which extra is missing
        require("matplotlib", "gcnet bench's plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = args.settings or (list(SETTINGS) if args.device == "cuda" else ["fp32"])
    protocols = ["ours", "release"] if args.protocol == "both" else [args.protocol]
    where = f"GCNet-{args.variant.upper()} on {args.device}" + \
        (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {torch.get_num_threads()} CPU thread(s)")
    notes = [release_note(release_form_error(args.variant, args.n_paths))] if "release" in args.forms else []
    timings = []
    for protocol in protocols:
        part = bench(args.variant, args.sizes, protocol=protocol, forms=args.forms, settings=settings,
                     device=args.device, warmup=args.warmup, repeats=args.repeats, min_time=args.min_time,
                     seconds=args.seconds, builds=args.builds, n_paths=args.n_paths,
                     progress=Progress("gcnet", quiet=args.quiet))
        print(f"{where}, batch 1, protocol {protocol}: "
              + PROTOCOLS[protocol].format(warmup=args.warmup, seconds=args.seconds, builds=args.builds))
        print(table(part, notes), end="\n\n")
        timings += part
    if args.out is not None or len(args.sizes) > 1:
        stem = Path(args.out or "runs/gcnet_bench") / f"gcnet_{args.variant}_{args.device}"
        print(f"wrote {write_csv(timings, stem.with_suffix('.csv'))} and {plot(timings, stem.with_suffix('.png'), where)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="FPS of our deploy form (and others), in our protocol or the release's",
                              description="FPS at batch 1 of our exact deploy form (reparam.fuse), the "
                              "training form and the model the release's speed script times (not exact), timed "
                              "per pass (ours: median, IQR) "
                              "or as the release's speed script does (throughput, mean over builds).")
    p.add_argument("--variant", choices=sorted(FACTORIES), default="s")
    p.add_argument("--sizes", type=_sizes, default=[(1024, 2048)], help="comma-separated HxW, e.g. 512x1024,1024x2048")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--protocol", choices=["ours", "release", "both"], default="ours",
                   help="ours: per-pass median and IQR; release: its speed script's throughput (default ours)")
    p.add_argument("--forms", nargs="+", choices=FORMS, default=["fused", "training"],
                   help="fused: our exact deploy form; training; release: the model the release's speed script times "
                        "(not exact: its rel err is printed)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                   help="columns (default: all on cuda, fp32 on cpu)")
    p.add_argument("--warmup", type=_count(0), default=10, help="warm-up passes (the release: 10)")
    p.add_argument("--repeats", type=_count(1), default=10, help="ours: timed passes")
    p.add_argument("--min-time", type=float, default=0.0, help="ours: time each form at least this many seconds")
    p.add_argument("--seconds", type=float, default=6.0, help="release: length of the timed run (its script: 6)")
    p.add_argument("--builds", type=_count(1), default=3, help="release: fresh builds averaged")
    p.add_argument("--n-paths", type=int, default=2, help=N_PATHS_HELP)
    p.add_argument("--threads", type=_count(1), default=None,
                   help="torch CPU threads (on a busy machine 1 thread can be far faster than several)")
    p.add_argument("--out", default=None, help="folder for the CSV and PNG (default runs/gcnet_bench "
                                               "when several sizes are given)")
    p.set_defaults(func=_command)
