"""`reparam report MODEL`: build a model, fuse it, print what changed, block by block.

MODEL is written one of three ways:
  timm:NAME               timm.create_model(NAME, **kwargs)             reparam report timm:repvgg_a0
  torchvision:NAME        torchvision.models.get_model(NAME, **kwargs)  reparam report torchvision:resnet50
  PACKAGE.MODULE:FACTORY  FACTORY(**kwargs)                             reparam report gcnet:gcnet_s
with keyword arguments from --kwargs num_classes=10,pretrained=False (values are Python literals).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import sys
from collections import Counter

import torch

from . import __version__
from .bench import compare
from .progress import Progress
from .summary import counts, group_by_block, health, health_table, named_shape

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
# float32 agreement is the product's promise; half precisions round every op differently
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}
SPELLINGS = "timm:NAME, torchvision:NAME or PACKAGE.MODULE:FACTORY (e.g. timm:repvgg_a0, gcnet:gcnet_s)"


class UsageError(Exception):
    """A mistake in the command (a flag value, a model name, an input shape): one line, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `PROG: error: ...` (exit 2), pointing at --help."""

    def error(self, message):
        prog = self.prog.split()[0]
        self.exit(2, f"{prog}: error: {message} (see {self.prog} --help)\n")


def parse_kwargs(text: str) -> dict:
    """'num_classes=10,pretrained=False' → {'num_classes': 10, 'pretrained': False}.

    Values are Python literals (numbers, strings, tuples, True/False/None), read with
    `ast.literal_eval`, so `img_size=(224,224)` keeps its comma."""
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if call.args:
            raise ValueError("every value needs a name (NAME=VALUE)")
        values = {}
        for k in call.keywords:
            try:
                values[k.arg] = ast.literal_eval(k.value)
            except ValueError:
                raise ValueError(f"{k.arg}={ast.unparse(k.value)} is not a Python literal "
                                 "(quote strings: name='x')") from None
        return values
    except SyntaxError:
        raise UsageError(f"--kwargs {text!r}: expected NAME=VALUE,... (e.g. num_classes=10,pretrained=False)") from None
    except ValueError as e:
        raise UsageError(f"--kwargs {text!r}: {e}") from None


def _registry(package: str, name: str):
    """The model builder of timm's or torchvision's registry for `name`."""
    try:
        if package == "timm":
            import timm
            if not timm.is_model(name):
                close = timm.list_models(f"*{name}*")[:5]
                raise UsageError(f"timm has no model '{name}'" + (f"; similar: {', '.join(close)}" if close else ""))
            return lambda **kw: timm.create_model(name, **kw)
        import torchvision.models
        if name not in torchvision.models.list_models():
            close = [m for m in torchvision.models.list_models() if name.lower() in m][:5]
            raise UsageError(f"torchvision has no model '{name}'" +
                             (f"; similar: {', '.join(close)}" if close else ""))
        return lambda **kw: torchvision.models.get_model(name, **kw)
    except ImportError as e:
        if e.name not in (None, package):  # the package is there; something it imports is not
            raise UsageError(f"'{package}:{name}': importing {package} failed: {e}") from None
        raise UsageError(f"'{package}:{name}' needs {package}: pip install {package}") from None


def load_factory(spec: str):
    """MODEL (see the module docstring) → a callable taking keyword arguments."""
    if ":" not in spec:
        raise UsageError(f"expected {SPELLINGS}, got '{spec}'")
    mod_name, attr = spec.split(":", 1)
    if mod_name in ("timm", "torchvision"):
        return _registry(mod_name, attr)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import '{mod_name}': {e}") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UsageError(f"'{mod_name}' has no callable '{attr}'")
    return factory


def build(spec: str, kwargs: dict) -> torch.nn.Module:
    """Call MODEL's factory with `kwargs`; a failure is a UsageError naming the call."""
    call = f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = load_factory(spec)(**kwargs)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 -- the factory is the user's: say what failed, one line
        raise UsageError(f"{call} failed: {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{call} returned a {type(model).__name__}, not an nn.Module")
    return model


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def model_and_input(args, progress: Progress) -> tuple[torch.nn.Module, torch.Tensor]:
    """The eval-mode model and a random input from the arguments of `add_model_arguments`
    (threads set, seeded); a model that fails on the input is a UsageError."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    progress.step(f"building {args.model}")
    model = build(args.model, args.kwargs).to(device=device, dtype=dtype).eval()
    x = torch.randn(args.input_shape, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:  # noqa: BLE001 -- the model's own check of its input
        hint = "; image models take N,C,H,W" if x.dim() != 4 else ""
        raise UsageError(f"{args.model} fails on --input-shape {','.join(map(str, x.shape))}: "
                         f"{type(e).__name__}: {_first_line(e)}{hint}") from e
    return model, x


def report(args) -> int:
    progress = Progress("reparam", quiet=args.quiet)
    model, x = model_and_input(args, progress)
    dtype, device = x.dtype, x.device
    cmp = compare(model, (x,), warmup=args.warmup, repeats=args.repeats, max_macs_ratio=args.max_macs_ratio,
                  progress=progress)
    rep = cmp.report
    print(f"model: {args.model}  input: {tuple(x.shape)} {args.dtype} on {device}, "
          f"{torch.get_num_threads()} CPU thread(s)\n")
    linears = [counts(m, "").linears for m in (model, cmp.fused)]
    print(cmp.table({"linear layers": [str(n) for n in linears]}))
    print(f"\nspeed-up: {cmp.speedup:.2f}×   fusion time: {cmp.fuse_seconds:.2f} s")
    print(f"({cmp.timing_note()})")
    rtol = args.rtol if args.rtol is not None else RTOL[dtype]
    ok = rep.max_rel_error is not None and rep.max_rel_error <= rtol
    print(f"outputs agree: {'yes' if ok else 'NO'} (max relative error {rep.max_rel_error:.3g}, limit {rtol:g})")
    for note in rep.notes:
        print(f"note: {note}")
    progress.step("grouping the rewrites by block")
    blocks = group_by_block(model, cmp.fused, rep.rewrites)
    by_rule = Counter(r.rule for r in rep.rewrites)
    print(f"\n{len(rep.rewrites)} rewrites ({', '.join(f'{k} {v}' for k, v in by_rule.items())}) "
          f"in {sum(b.is_block for b in blocks)} multi-branch block(s) and {sum(not b.is_block for b in blocks)} "
          "other module(s)" + ("; -v lists each rewrite" if not args.verbose else "") + ":")
    for b in blocks:
        print(f"  {b.line()}")
        if args.verbose:
            for r in b.rewrites:
                print(f"      {r.rule:<17} {r.path:<40} {named_shape(r.shape)}  ({r.detail})")
    print(f"{len(rep.skipped)} places left alone" + (":" if rep.skipped else ""))
    for s in rep.skipped:
        print(f"  {s.path:<40} {s.reason}")
    if rep.norms_left:
        print(f"{len(rep.norms_left)} batch norms left (the first reason for each):")
        for s in rep.norms_left:
            print(f"  {s.path:<40} {s.reason}")
    for u in rep.untraced:
        print(f"untraced: {u.line()}")
    if args.health:
        print("\ndeployment health of the fused layers (fractions of weights; int8: symmetric per output "
              "channel, relative error):")
        print(health_table(health(cmp.fused, rep.rewrites)))
    return 0 if ok else 1


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got '{text}'")
    if any(v < 1 for v in shape):
        raise argparse.ArgumentTypeError(f"every size must be at least 1, got '{text}'")
    return shape


def _kwargs(text: str) -> dict:
    try:
        return parse_kwargs(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--kwargs {text!r}: ")) from None


def _threads(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{text}'")
    return int(text)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --kwargs, --input-shape, --dtype, --device, --threads, --seed: what
    `model_and_input` reads (shared with benchmarks/fuse_bench.py)."""
    p.add_argument("model", metavar="MODEL", help=SPELLINGS)
    p.add_argument("--kwargs", type=_kwargs, default={}, metavar="NAME=VALUE,...",
                   help="keyword arguments for the factory, e.g. num_classes=10,pretrained=False")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224), help="N,C,H,W (default 1,3,224,224)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=_threads, default=None,
                   help="torch CPU threads (default: torch's; the output says how many)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="reparam", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"reparam {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="fuse a model and print the before/after table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(r)
    r.add_argument("--repeats", type=_threads, default=10, help="timed passes per form, interleaved")
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--rtol", type=float, default=None, help="limit on the max relative error")
    r.add_argument("--max-macs-ratio", type=float, default=1.0,
                   help="allow merges costing up to this times the MACs they replace (inf: all exact merges)")
    r.add_argument("-v", "--verbose", action="store_true", help="list every rewrite under its block")
    r.add_argument("--health", action="store_true",
                   help="per fused layer: max |w|, fp16/bf16 overflow and subnormals, int8 per-channel error")
    r.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    r.set_defaults(func=report)
    return p


def run(prog: str, func, args) -> int:
    """`func(args)`, with a UsageError printed as one line `PROG: error: ...` (exit 2), or
    raised with its traceback under `args.debug`."""
    try:
        return func(args)
    except UsageError as e:
        if args.debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run("reparam", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
