"""`gcnet export`: GCNet's deploy form (`reparam.fuse`) as ONNX, TorchScript or a `torch.export` program.

    gcnet export --variant s --format onnx --out gcnet_s.onnx --size 1024 2048
    gcnet export --checkpoint runs/gcnet-demo/last.pt --format pt2 --out demo.pt2 --size 128 128

The ONNX file's input is `image` (batch × 3 × height × width, all three free unless --static)
and its output `logits`. The exported file is read back (onnxruntime for ONNX) and compared
with the training-form model in eval mode, for a dynamic ONNX file on two input sizes; the
command fails if they differ by more than a relative error of 1e-4.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import reparam
from reparam.export import check_onnx, to_onnx, to_pt2, to_torchscript
from reparam.progress import QUIET, Progress
from reparam.testing import rel_error

from .checkpoint import load as load_weights
from .errors import require
from .evaluate import deploy, deploy_metadata, load_for_inference
from .model import FACTORIES

FORMATS = {"onnx": to_onnx, "torchscript": to_torchscript, "pt2": to_pt2}
RTOL = 1e-4  # float32 through another runtime: its kernels sum in another order


@dataclass
class Exported:
    path: Path
    format: str
    report: reparam.Report   # the fuse: rewrites, before/after counts
    rel_error: float         # the largest of `errors`
    errors: dict             # input shape → the file's max relative error against the training form


@torch.no_grad()
def reload_error(path, fmt: str, model: nn.Module, example: torch.Tensor) -> float:
    """Max relative error of the exported file at `path`, run by its runtime, against `model`."""
    if fmt == "onnx":
        return check_onnx(path, model, (example,))
    loaded = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    return rel_error(model(example), loaded(example))


def other_size(size) -> tuple[int, int]:
    """A second input size for the parity check of a dynamic file: half the first (multiples of
    64, at least 64), or 64 more where that is the first."""
    half = tuple(max(64, s // 2 // 64 * 64) for s in size)
    return half if half != tuple(size) else tuple(s + 64 for s in size)


def export(model: nn.Module, fmt: str, out: str | os.PathLike, size: tuple[int, int] = (1024, 2048), *,
           overwrite: bool = False, dynamic: bool = True, progress: Progress = QUIET) -> Exported:
    """Fuse `model` (an eval-mode copy; `model` is not changed), write it as `fmt` and check the
    file against `model`.

    Args:
        model: a training-form GCNet.
        fmt: "onnx", "torchscript" or "pt2".
        out: the file to write.
        size: (H, W) of the example input, multiples of 64 for exact pyramid sizes.
        overwrite: replace an existing file.
        dynamic: ONNX only: batch, height and width are free axes (the check then runs at
            batch 1 and `size`, and at batch 2 and `other_size(size)`); else fixed.
        progress: step lines (default: none).

    Returns:
        Exported: the path, the fuse report and the file's errors against PyTorch.

    Raises:
        ValueError: an unknown format.
        FileExistsError: `out` exists and `overwrite` is False.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; choose from {sorted(FORMATS)}")
    if Path(out).exists() and not overwrite:  # before the fuse, not after it
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    model = model.eval()
    progress.step("fusing with reparam.fuse")
    fused, report = deploy(model)
    channels = model.config.in_channels
    example = torch.randn(1, channels, *size)
    options = {"input_names": ["image"], "output_names": ["logits"], "dynamic": dynamic} if fmt == "onnx" else {}
    progress.step(f"exporting {fmt}" + (" (dynamic batch, height, width)" if options.get("dynamic") else ""))
    path = FORMATS[fmt](fused, (example,), out, overwrite=overwrite, **options)
    checks = [example] + ([torch.randn(2, channels, *other_size(size))] if options.get("dynamic") else [])
    errors = {}
    for x in checks:
        progress.step(f"checking the file on {tuple(x.shape)} against PyTorch")
        errors[tuple(x.shape)] = reload_error(path, fmt, model, x)
    return Exported(path, fmt, report, max(errors.values()), errors)


def _command(args) -> int:
    if args.format == "onnx":  # before any work: say which extra is missing
        for module in ("onnx", "onnxscript", "onnxruntime"):
            require(module, "gcnet export --format onnx")
    progress = Progress("gcnet", quiet=args.quiet)
    if args.checkpoint and deploy_metadata(args.checkpoint) is not None:  # the fused form already
        model, _ = load_for_inference(args.checkpoint, variant=args.variant)
    elif args.checkpoint:
        model = load_weights(args.checkpoint, variant=args.variant, trust_pickle=args.trust_pickle)
    else:
        torch.manual_seed(args.seed)
        model = FACTORIES[args.variant or "s"](num_classes=args.num_classes)
    result = export(model, args.format, args.out, tuple(args.size), overwrite=args.overwrite,
                    dynamic=not args.static, progress=progress)
    after = result.report.after
    shape = "batch×3×height×width, named image → logits" if args.format == "onnx" and not args.static else \
        f"1×3×{args.size[0]}×{args.size[1]}"
    print(f"wrote {result.path} ({args.format}, input {shape}; "
          f"deploy form: {after.convs} convs, {after.bns} BNs, {after.params / 1e6:.2f} M params)")
    ok = result.rel_error <= RTOL
    for shape, err in result.errors.items():
        print(f"{args.format} output vs PyTorch training form on {'×'.join(map(str, shape))}: "
              f"max relative error {err:.3g} ({'ok' if err <= RTOL else 'TOO LARGE'}, limit {RTOL:g})")
    return 0 if ok else 1


def _size(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value <= 0 or value % 64:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 64, got '{text}'")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write the fused deploy model as ONNX, TorchScript or .pt2",
                              description="Fuse GCNet with reparam.fuse and export it; the file is read "
                              "back and checked against PyTorch (relative error <= 1e-4).")
    p.add_argument("--variant", choices=sorted(FACTORIES),
                   help="GCNet variant without --checkpoint (default s); with it, checked against the file")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx, .ts or .pt2)")
    p.add_argument("--checkpoint", help="weights: a gcnet train checkpoint, deploy file or converted "
                   "release file (default: random weights)")
    p.add_argument("--size", type=_size, nargs=2, default=[1024, 2048], metavar=("H", "W"),
                   help="input height and width, multiples of 64 (default 1024 2048)")
    p.add_argument("--num-classes", type=int, default=19, help="classes without a checkpoint (default 19)")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed without a checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--static", action="store_true", help="ONNX: fixed 1×3×H×W input (default: batch, height "
                   "and width free, checked on two sizes)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False (runs pickled code: only for files you trust)")
    p.set_defaults(func=_command)
