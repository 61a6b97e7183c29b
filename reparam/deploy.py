"""Deploy artifacts that are the deploy form: the fused weights only, rebuilt without computing.

    reparam.save(fused, "deploy.safetensors", build="gcnet:gcnet_s")
    fused = reparam.load("deploy.safetensors", gcnet.gcnet_s)

The file is safetensors: the fused model's tensors (GCNet-S: 9.2 M parameters, not the training
form's 20.7 M) and metadata (the format, the reparam version, how to build the model, the
fuse options, anything the caller adds). `load` builds the training-form structure on the
`meta` device, fuses it there (structure only: no weight is computed), and puts the file's
tensors in place; the keys and shapes must match exactly, else a clear error says so.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

FORMAT = "reparam-deploy/1"


def save(fused: nn.Module, path: str | os.PathLike, *, build: str | None = None, max_macs_ratio: float = 1.0,
         metadata: dict | None = None) -> Path:
    """Write `fused` (the result of `reparam.fuse`) to `path` as safetensors.

    Args:
        fused: the fused model.
        path: the file to write (written to a temporary file first, then renamed).
        build: how to build the training form again, e.g. "gcnet:gcnet_s" (stored, for `load`
            callers and people who read the file).
        max_macs_ratio: the cost guard `fused` was fused with (`load` fuses with the same).
        metadata: more string-keyed, JSON-serializable facts to store (variant, classes, ...).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in fused.state_dict().items()}
    meta = {"format": FORMAT, "reparam": _version(), "build": build or "",
            "max_macs_ratio": repr(float(max_macs_ratio)), "metadata": json.dumps(metadata or {})}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata `save` stored (raises ValueError naming the file if it is not such a file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path}: not a reparam deploy file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a reparam deploy file (format {meta.get('format')!r}, expected {FORMAT!r})")
    return {**meta, "metadata": json.loads(meta.get("metadata") or "{}")}


def load(path: str | os.PathLike, build: Callable[[], nn.Module], *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, example_inputs: tuple | None = None) -> nn.Module:
    """The deploy model stored at `path`, built by fusing `build()` on the meta device.

    Args:
        path: a file written by `save`.
        build: a callable returning the training-form model (random weights are never made:
            it runs under the meta device).
        device: where the loaded tensors go.
        dtype: cast floating tensors to this dtype (None: as stored).
        example_inputs: only where the model needs them to be fused (torch.export front end).

    Returns:
        The fused model in eval mode, with the file's weights.

    Raises:
        ValueError: the file is not a deploy file, or it was written for another structure.
    """
    from safetensors.torch import load_file

    from .fuse import fuse

    meta = read_metadata(path)
    with torch.device("meta"):
        model = build()
    inputs = None if example_inputs is None else tuple(t.to("meta") for t in example_inputs)
    structure = fuse(model.eval(), inputs, max_macs_ratio=float(meta.get("max_macs_ratio", "1.0")))
    tensors = load_file(str(path), device=str(device))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    want = {k: tuple(v.shape) for k, v in structure.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(f"{path}: written for another structure than build() fuses to "
                         f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} of another shape"
                         f"{': ' + (missing + extra + wrong)[0] if missing or extra or wrong else ''}); "
                         f"it was saved from {meta.get('build') or 'an unnamed build'}")
    structure.load_state_dict(tensors, assign=True)
    left = [n for n, t in [*structure.named_parameters(), *structure.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path}: the file holds no values for {left[0]} (and {len(left) - 1} more)")
    return structure.eval()


def _version() -> str:
    from . import __version__
    return __version__
