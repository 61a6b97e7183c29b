"""Deploy files for a (fused) model: ONNX, TorchScript and `torch.export` programs (.pt2).

    deploy = reparam.fuse(model, (x,))
    path = to_onnx(deploy, (x,), "model.onnx")
    print(check_onnx(path, model.eval(), (x,)))     # max relative error of onnxruntime vs PyTorch

Each writer exports `model` as it is (call `reparam.fuse` first for the deploy form), writes
a temporary file beside `path` and moves it into place with `os.replace`, so a failed export
never leaves half a file, and refuses to replace an existing file unless `overwrite=True`.
ONNX goes through torch's `torch.export`-based exporter (`dynamo=True`, which needs
`onnxscript`); `check_onnx` needs `onnxruntime`.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .testing import rel_error


def _inputs(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _require_eval(model: nn.Module, fmt: str):
    if model.training:
        # a training-mode export records batch statistics and dropout: not the deploy function
        raise ValueError(f"{fmt} export of a model in training mode; call model.eval() "
                         "(reparam.fuse returns an eval-mode model)")


def write_atomic(path, overwrite: bool, write: Callable[[str], None]) -> Path:
    """Run `write(tmp)` on a temporary file beside `path` (same suffix: torch.export checks it),
    then move it to `path`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}"))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def to_onnx(model: nn.Module, example_inputs: torch.Tensor | tuple, path: str | Path, *, opset: int | None = None, overwrite: bool = False,
            input_names: list[str] | None = None, output_names: list[str] | None = None,
            dynamic: bool = False) -> Path:
    """Write `model` as an ONNX file (weights inside it) for inputs shaped like `example_inputs`.

    Args:
        model: an eval-mode model (call `reparam.fuse` first for the deploy form).
        example_inputs: a tensor or a tuple of the forward's arguments, e.g. (1, 3, H, W).
        path: the file to write.
        opset: ONNX opset (None: the exporter's default).
        overwrite: replace an existing file.
        input_names: the graph's input names (None: the exporter's).
        output_names: the graph's output names (None: the exporter's).
        dynamic: batch (dim 0) and, for 4-D inputs, height and width (dims 2, 3) are free;
            else the file holds the example's fixed shapes.

    Returns:
        The path written.

    Raises:
        ValueError: the model is in training mode.
        FileExistsError: `path` exists and `overwrite` is False.
    """
    _require_eval(model, "ONNX")
    inputs = _inputs(example_inputs)
    shapes = None
    if dynamic:
        axes = lambda t: {0: torch.export.Dim.DYNAMIC, **({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
                                                          if t.dim() == 4 else {})}
        shapes = tuple(axes(t) for t in inputs)

    def write(tmp: str):
        with torch.no_grad():
            program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset, verbose=False,
                                        input_names=input_names, output_names=output_names, dynamic_shapes=shapes)
        program.save(tmp, external_data=False)
        if dynamic:
            _name_free_axes(tmp)

    return write_atomic(path, overwrite, write)


def _name_free_axes(path: str) -> None:
    """Rename the exporter's symbols (s77) of the inputs' free axes to batch, height, width
    (input_1_batch, ... with several inputs), everywhere they occur in the file."""
    import onnx
    proto = onnx.load(path)
    names = {}
    for i, value in enumerate(proto.graph.input):
        prefix = f"input_{i}_" if len(proto.graph.input) > 1 else ""
        for axis, dim in zip(("batch", "channels", "height", "width"), value.type.tensor_type.shape.dim):
            if dim.dim_param:
                names.setdefault(dim.dim_param, prefix + axis)
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    onnx.save(proto, path)


def onnx_io(path) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """([(name, shape)] of the inputs, the same of the outputs) of an ONNX file; a free axis
    shows as its symbol (a string), a fixed one as its size."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return [(i.name, dims(i)) for i in graph.input], [(o.name, dims(o)) for o in graph.output]


def to_torchscript(model: nn.Module, example_inputs, path, *, overwrite: bool = False) -> Path:
    """Write `torch.jit.trace(model, example_inputs)`. A fused model is a straight-line
    GraphModule, so tracing loses no control flow (and `torch.jit.script` rejects the type
    annotations fx writes into its code). Load with `torch.jit.load`."""
    _require_eval(model, "TorchScript")
    inputs = _inputs(example_inputs)

    def write(tmp: str):
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(model, inputs), tmp)

    return write_atomic(path, overwrite, write)


def to_pt2(model: nn.Module, example_inputs, path, *, overwrite: bool = False) -> Path:
    """Write `torch.export.export(model, example_inputs)` with `torch.export.save`.
    Load with `torch.export.load(path).module()`."""
    _require_eval(model, "torch.export")
    inputs = _inputs(example_inputs)

    def write(tmp: str):
        with torch.no_grad():
            program = torch.export.export(model, inputs)
        torch.export.save(program, tmp)

    return write_atomic(path, overwrite, write)


def _session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path, example_inputs) -> list[torch.Tensor]:
    """The outputs of the ONNX file at `path` on `example_inputs`, run with onnxruntime on CPU."""
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, _inputs(example_inputs))}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


@torch.no_grad()
def check_onnx(path, model: nn.Module, example_inputs) -> float:
    """Max relative error (`reparam.testing.rel_error`) of onnxruntime's outputs against
    `model`'s on `example_inputs`. Pass the original eval-mode model to check fuse and export at once."""
    expected = model(*_inputs(example_inputs))
    return rel_error(expected, run_onnx(path, example_inputs))


def onnx_op_counts(path) -> Counter:
    """How many nodes of each op type the ONNX file's main graph has, e.g. {'Conv': 50, 'Relu': 47}."""
    import onnx
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
