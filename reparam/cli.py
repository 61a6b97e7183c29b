"""`reparam report PACKAGE.MODULE:FACTORY`: build a model, fuse it, print what changed."""
from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter

import torch

from .bench import compare

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
# float32 agreement is the product's promise; half precisions round every op differently
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def load_factory(spec: str):
    """'package.module:factory' → the callable. Errors say what to write instead."""
    if ":" not in spec:
        raise SystemExit(f"reparam: expected PACKAGE.MODULE:FACTORY (e.g. torchvision.models:resnet18), got '{spec}'")
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"reparam: cannot import '{mod_name}': {e}")
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise SystemExit(f"reparam: '{mod_name}' has no attribute '{attr}'")


def report(args) -> int:
    torch.manual_seed(args.seed)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    model = load_factory(args.factory)().to(device=device, dtype=dtype).eval()
    x = torch.randn(args.input_shape, device=device, dtype=dtype)
    cmp = compare(model, (x,), warmup=args.warmup, repeats=args.repeats, max_macs_ratio=args.max_macs_ratio)
    rep = cmp.report
    print(f"model: {args.factory}  input: {tuple(x.shape)} {args.dtype} on {device}\n")
    print(cmp.table())
    speedup = cmp.latency_before[0] / cmp.latency_after[0]
    print(f"\nspeed-up: {speedup:.2f}×   fusion time: {cmp.fuse_seconds:.2f} s")
    rtol = args.rtol if args.rtol is not None else RTOL[dtype]
    ok = rep.max_rel_error is not None and rep.max_rel_error <= rtol
    print(f"outputs agree: {'yes' if ok else 'NO'} (max relative error {rep.max_rel_error:.3g}, limit {rtol:g})")
    for note in rep.notes:
        print(f"note: {note}")
    by_rule = Counter(r.rule for r in rep.rewrites)
    print(f"\n{len(rep.rewrites)} rewrites: " + ", ".join(f"{k} {v}" for k, v in by_rule.items()))
    if args.verbose:
        for r in rep.rewrites:
            print(f"  {r.rule:<17} {r.path:<40} {r.shape}  ({r.detail})")
    print(f"{len(rep.skipped)} places left alone" + (":" if rep.skipped else ""))
    for s in rep.skipped:
        print(f"  {s.path:<40} {s.reason}")
    for u in rep.untraced:
        print(f"untraced: {u.path}: {u.message}")
    return 0 if ok else 1


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got '{text}'")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="reparam", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="fuse a model and print the before/after table")
    r.add_argument("factory", help="PACKAGE.MODULE:FACTORY, called with no arguments")
    r.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224))
    r.add_argument("--dtype", choices=DTYPES, default="float32")
    r.add_argument("--device", default="cpu")
    r.add_argument("--repeats", type=int, default=10)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--rtol", type=float, default=None, help="limit on the max relative error")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-macs-ratio", type=float, default=1.0,
                   help="allow merges costing up to this times the MACs they replace (inf: all exact merges)")
    r.add_argument("-v", "--verbose", action="store_true", help="list every rewrite")
    r.set_defaults(func=report)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
