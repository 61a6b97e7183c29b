"""Front ends: a model in, a torch.fx GraphModule out (or why not).

`symbolic_trace` with parameters kept concrete, so a kernel built from parameters inside
`forward` (OREPA) is computed at trace time and enters the graph as a constant; `torch.export`
with example inputs where symbolic tracing fails (shape-dependent code, `int(x.shape[2])`)."""
from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import fx, nn

from .nn import BNAndPad


class ConcreteParamTracer(fx.Tracer):
    """Parameters and buffers read in `forward` are real tensors, not proxies."""

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val

    def trace(self, root, concrete_args=None):
        self._names = None
        return super().trace(root, concrete_args)

    def create_arg(self, a):
        """A parameter or buffer becomes a get_attr node, found by identity in one dict (fx
        scans the whole model for each one: quadratic in the model's size)."""
        if isinstance(a, torch.Tensor) and isinstance(getattr(self, "root", None), nn.Module):
            if self._names is None:
                self._names = {}
                for name, t in [*self.root.named_parameters(), *self.root.named_buffers()]:
                    self._names.setdefault(id(t), name)
            name = self._names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BNAndPad) or super().is_leaf_module(m, qualname)


def symbolic(model: nn.Module) -> fx.GraphModule:
    tracer = ConcreteParamTracer()
    with torch.no_grad():
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


@contextlib.contextmanager
def _quiet():
    """torch.export logs whole graphs when it gives up; the report carries the message instead."""
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch.export", "torch._export",
                                               "torch.fx.experimental.symbolic_shapes", "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def exported(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    with torch.no_grad(), _quiet():
        ep = torch.export.export(model, tuple(example_inputs), strict=False)
    return ep.module()


def trace(model: nn.Module, example_inputs=None) -> tuple[fx.GraphModule | None, list[str]]:
    """(graph module in eval mode, the messages of the front ends that failed before), or
    (None, every front end's message)."""
    errors = []
    try:
        return symbolic(model).eval(), []
    except Exception as e:  # any tracer failure means: try the next front end
        errors.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {_first_line(e)}")
    if example_inputs is not None:
        try:  # an exported module is traced in eval mode and refuses .train()/.eval()
            return exported(model, example_inputs), errors
        except Exception as e:
            errors.append(f"torch.export: {type(e).__name__}: {_first_line(e)}")
    return None, errors


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
