"""Counting what a model runs: convolutions, batch norms, parameters, multiply-accumulates."""
from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

_BN_OPS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
           "_native_batch_norm_legit", "cudnn_batch_norm", "miopen_batch_norm"}


@dataclass(frozen=True)
class Stats:
    """What a model contains (params) and, with example inputs, what one forward runs.

    Attributes:
        convs: convolution and linear (matmul) ops one forward runs; without inputs, the conv
            and linear modules. A Linear counts: it is the 1×1 conv of a channels-last layout.
        bns: batch-norm ops one forward runs; without inputs, the BN modules.
        params: parameters (a tensor shared by several modules counts once).
        macs: multiply-accumulates of one forward; None without inputs.
    """
    convs: int          # convolution (and linear) ops executed; conv/linear modules without inputs
    bns: int            # batch-norm ops executed; BN modules without inputs
    params: int         # parameter count (shared tensors once)
    macs: float | None  # multiply-accumulates of one forward, None without inputs


class _OpCounter(TorchDispatchMode):
    """Counts conv/matmul and BN ops as they run, and the convs' and matmuls' MACs."""

    def __init__(self):
        super().__init__()
        self.convs = self.bns = 0
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        if name == "convolution":
            self.convs += 1
            # w[0] holds one output's (C_in/groups × kernel) weights; transposed: one input's
            transposed = len(args) > 6 and args[6]
            self.macs += (args[0] if transposed else out).numel() * args[1][0].numel()
        elif name in ("mm", "addmm", "bmm"):
            self.convs += 1
            a = args[1] if name == "addmm" else args[0]
            self.macs += out.numel() * a.shape[-1]
        elif name in _BN_OPS:
            self.bns += 1
        return out


_CONV_FNS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
             "linear", "convolution"}


def _functional_conv(node: fx.Node) -> bool:
    t = node.target
    name = t._overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", "")
    return node.op == "call_function" and name in _CONV_FNS


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def count(model: nn.Module, example_inputs=None) -> Stats:
    """Convs, BNs and params of `model`; with `example_inputs` (a tuple), the ops one forward runs.

    Counting ops executed (at the ATen level) also sees `F.conv2d` calls and shared modules that
    module counting misses. A Linear counts as a convolution (a 1×1 conv on a 2-D input)."""
    params = count_params(model)
    if example_inputs is None:
        convs = sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in model.modules())
        # and the functional ones a graph calls (`F.conv2d(x, weight=self.k0)`, ATen convolution)
        convs += sum(_functional_conv(n) for m in model.modules() if isinstance(m, fx.GraphModule)
                     for n in m.graph.nodes)
        bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        return Stats(convs, bns, params, None)
    return run_counted(model, example_inputs)[0]


@torch.no_grad()
def run_counted(model: nn.Module, example_inputs) -> tuple[Stats, object]:
    """(what one forward on `example_inputs` runs, its output)."""
    ops = _OpCounter()
    with ops:
        out = model(*example_inputs)
    return Stats(ops.convs, ops.bns, count_params(model), float(ops.macs)), out


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(model: nn.Module, example_inputs, *, warmup: int = 3, repeats: int = 10,
            min_time: float = 0.0) -> tuple[float, float]:
    """Median and spread (max - min) of one forward, in seconds, after `warmup` runs.

    Runs at least `repeats` times and at least `min_time` seconds in all."""
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), None)
    for _ in range(warmup):
        model(*example_inputs)
    _sync(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        model(*example_inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return median(times), max(times) - min(times)
