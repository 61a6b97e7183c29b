"""Before/after comparison of a model and its fused form: counts, error, fusion time, latency.

Latency is timed interleaved: pass i of the original, then pass i of the fused form (the order
alternating), so a load spike on a shared machine hits both forms alike. Each form's figure is
its median with the interquartile range; the speed-up is the median of the per-pair ratios.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .fuse import fuse_with_report
from .progress import QUIET, Progress
from .report import Report, stats_table
from .stats import latency

TIMING_NOTE = ("latency: median (interquartile range) of {n} interleaved passes per form, "
               "{threads} CPU thread(s); speed-up: median of the {n} per-pair ratios")


@dataclass
class Comparison:
    fused: nn.Module
    report: Report
    fuse_seconds: float
    latency_before: tuple[float, float, float]  # seconds: (median, first quartile, third quartile)
    latency_after: tuple[float, float, float]
    speedup: float  # median over the interleaved pairs of before / after
    passes: int     # timed passes per form
    threads: int    # torch.get_num_threads() while timing

    def table(self, extra: dict[str, list[str]] | None = None) -> str:
        """The before/after counts, `extra` rows, then the latencies."""
        ms = lambda t: f"{t[0] * 1e3:.2f} ms (IQR {t[1] * 1e3:.2f}-{t[2] * 1e3:.2f})"
        return stats_table({"before": self.report.before, "after": self.report.after},
                           {**(extra or {}), "latency": [ms(self.latency_before), ms(self.latency_after)]})

    def timing_note(self) -> str:
        return TIMING_NOTE.format(n=self.passes, threads=self.threads)


def quartiles(times: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of `times`."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return med, q1, q3


def interleaved(a: nn.Module, b: nn.Module, example_inputs, *, warmup: int = 3, repeats: int = 10,
                min_time: float = 0.0, progress: Progress = QUIET) -> tuple[list[float], list[float]]:
    """Seconds per pass of `a` and `b`, timed in alternation (a b, b a, a b, ...) after `warmup`
    passes of each; at least `repeats` pairs and at least `min_time` seconds in all."""
    for model in (a, b):
        latency(model, example_inputs, warmup=warmup, repeats=1)
    times_a, times_b, start = [], [], time.perf_counter()
    bar = progress.bar(total=repeats, desc="timing")
    while len(times_a) < repeats or time.perf_counter() - start < min_time:
        first_a = len(times_a) % 2 == 0
        for model, times in ((a, times_a), (b, times_b)) if first_a else ((b, times_b), (a, times_a)):
            times.append(latency(model, example_inputs, warmup=0, repeats=1)[0])
        bar.update()
    bar.close()
    return times_a, times_b


def compare(model: nn.Module, example_inputs: tuple, *, warmup: int = 3, repeats: int = 10,
            min_time: float = 0.0, max_macs_ratio: float = 1.0, progress: Progress = QUIET) -> Comparison:
    """Fuse `model` and time both forms on `example_inputs`, interleaved (see the module docstring).

    Args:
        model: the model to fuse (not changed: a copy is fused).
        example_inputs: a tuple of the forward's arguments.
        warmup: untimed passes of each form first.
        repeats: timed passes of each form (at least).
        min_time: time for at least this many seconds in all.
        max_macs_ratio: `reparam.fuse`'s cost guard.
        progress: where step lines and the timing bar go (default: nowhere).

    Returns:
        A Comparison: the fused model, its report, the fusion time and both latencies.
    """
    original = copy.deepcopy(model).eval()
    progress.step("fusing (every rewrite is checked before it is applied)")
    t0 = time.perf_counter()
    fused, report = fuse_with_report(model, example_inputs, max_macs_ratio=max_macs_ratio)
    seconds = time.perf_counter() - t0
    progress.step(f"timing both forms, {repeats} interleaved passes each")
    with torch.inference_mode():
        before, after = interleaved(original, fused, example_inputs, warmup=warmup, repeats=repeats,
                                    min_time=min_time, progress=progress)
    speedup = statistics.median(x / y for x, y in zip(before, after))
    return Comparison(fused, report, seconds, quartiles(before), quartiles(after), speedup, len(before),
                      torch.get_num_threads())
