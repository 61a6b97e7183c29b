"""Before/after comparison of a model and its fused form: counts, error, fusion time, latency."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .fuse import fuse_with_report
from .report import Report, stats_table
from .stats import latency


@dataclass
class Comparison:
    fused: nn.Module
    report: Report
    fuse_seconds: float
    latency_before: tuple[float, float]  # (median, spread) seconds
    latency_after: tuple[float, float]

    def table(self) -> str:
        ms = lambda t: f"{t[0] * 1e3:.2f} ms ±{t[1] * 1e3:.2f}"
        return stats_table({"before": self.report.before, "after": self.report.after},
                           {"latency": [ms(self.latency_before), ms(self.latency_after)]})


def compare(model: nn.Module, example_inputs: tuple, *, warmup: int = 3, repeats: int = 10,
            min_time: float = 0.0, max_macs_ratio: float = 1.0) -> Comparison:
    """Fuse `model` and time both forms on `example_inputs` (medians, warm-up first)."""
    original = copy.deepcopy(model).eval()
    t0 = time.perf_counter()
    fused, report = fuse_with_report(model, example_inputs, max_macs_ratio=max_macs_ratio)
    seconds = time.perf_counter() - t0
    with torch.inference_mode():
        before = latency(original, example_inputs, warmup=warmup, repeats=repeats, min_time=min_time)
        after = latency(fused, example_inputs, warmup=warmup, repeats=repeats, min_time=min_time)
    return Comparison(fused, report, seconds, before, after)
