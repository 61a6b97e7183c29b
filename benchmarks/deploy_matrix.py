"""How much faster is the deploy form in the runtime you will use? The training form and the
`reparam.fuse` form of each model, in eager PyTorch, eager channels-last, `torch.compile`
(Inductor, with freezing) and ONNX Runtime (all graph optimizations), timed interleaved.

    python benchmarks/deploy_matrix.py --threads 1,2                       # GCNet-S, RepVGG-A0, MobileOne-S0, YOLOv8n
    python benchmarks/deploy_matrix.py --models gcnet_s gcnet_m gcnet_l --runs 5
    python benchmarks/deploy_matrix.py --models repvgg_a0 --runtimes eager onnxruntime --size 224

Runtimes fold BatchNorm into the preceding conv (ONNX Runtime's ConvBNFusion, Inductor's
freezing) but leave parallel branches as they are: this measures what they recover of what
`reparam.fuse` removes. Per (thread count, model, runtime): the training form and the fused form
are timed in alternation (`reparam.bench.interleaved`); latency is the median with the
interquartile range, fused/training is the median of the per-pair ratios (below 1: the fused form
is faster). MACs are counted once per form (`reparam.count`, the ops one eager forward runs);
GMAC/s is that count over the median latency, and "of ceiling" is GMAC/s over the GMAC/s of one
large 3×3 conv timed at the start of the same run (eager, the faster of the two memory formats):
the practical ceiling of this machine. "rel err" is each output's max relative error against the
eager training form. "convs/BNs": the convs (and linears) and BNs one eager forward runs; for ONNX
Runtime the nodes of its optimized graph. A runtime that fails gives a row with the reason.
On CUDA the same runs, plus eager fp16, with `cudnn.benchmark` on and GCNet at 1024×2048 (the
release's protocol: eager fp32, batch 1); ONNX Runtime then needs its CUDA provider.
Weights are random (`randomize_norms` gives every BN statistics), nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: never reach the network

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples`

import reparam  # noqa: E402
from examples.blocks import randomize_norms  # noqa: E402
from reparam.bench import interleaved, quartiles  # noqa: E402
from reparam.export import onnx_op_counts, to_onnx  # noqa: E402
from reparam.stats import latency  # noqa: E402
from reparam.testing import rel_error  # noqa: E402

TRAINING, FUSED, ULTRALYTICS = "training", "fused", "ultralytics-fuse"


class FirstOutput(nn.Module):
    """The first tensor of a model returning (tensor, extras), e.g. a YOLO's detections."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]                   # a fresh training-form model (eval mode is set later)
    size: tuple[int, int]                            # default input H×W
    cuda_size: tuple[int, int] | None = None         # on CUDA, where it differs (the release's protocol)
    extra_forms: dict[str, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)
    note: str = ""


def _gcnet(variant: str) -> Callable[[], nn.Module]:
    def build():
        from gcnet.model import FACTORIES
        return FACTORIES[variant]()
    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build():
        import timm
        return timm.create_model(name, pretrained=False)
    return build


def _yolo(cfg: str) -> Callable[[], nn.Module]:
    def build():
        from ultralytics.nn.tasks import DetectionModel
        return FirstOutput(DetectionModel(cfg, verbose=False))
    return build


def _ultralytics_fuse(model: FirstOutput) -> nn.Module:
    """Ultralytics' own deploy step (`model.fuse()`: conv-BN, and RepConv where a model has it)."""
    return FirstOutput(copy.deepcopy(model.model).fuse(verbose=False)).eval()


MODELS: dict[str, ModelSpec] = {
    "gcnet_s": ModelSpec(_gcnet("s"), (512, 1024), (1024, 2048)),
    "gcnet_m": ModelSpec(_gcnet("m"), (512, 1024), (1024, 2048)),
    "gcnet_l": ModelSpec(_gcnet("l"), (512, 1024), (1024, 2048)),
    "repvgg_a0": ModelSpec(_timm("repvgg_a0"), (224, 224)),
    "mobileone_s0": ModelSpec(_timm("mobileone_s0"), (224, 224)),
    "yolov8n": ModelSpec(_yolo("yolov8n.yaml"), (640, 640), extra_forms={ULTRALYTICS: _ultralytics_fuse},
                         note="yolov8n has no multi-branch block: fusing folds BNs only (a control)"),
}
DEFAULT_MODELS = ["gcnet_s", "repvgg_a0", "mobileone_s0", "yolov8n"]


@dataclass(frozen=True)
class Runtime:
    dtype: torch.dtype
    channels_last: bool = False
    compile: bool = False
    onnx: bool = False


RUNTIMES = {
    "eager": Runtime(torch.float32),
    "channels-last": Runtime(torch.float32, channels_last=True),
    "compile": Runtime(torch.float32, compile=True),
    "onnxruntime": Runtime(torch.float32, onnx=True),
    "eager-fp16": Runtime(torch.float16),
}
CPU_RUNTIMES = ["eager", "channels-last", "compile", "onnxruntime"]
CUDA_RUNTIMES = CPU_RUNTIMES + ["eager-fp16"]


@dataclass
class Row:
    threads: int
    model: str
    runtime: str
    form: str
    size: tuple[int, int]
    dtype: str
    macs: float                 # one forward of this form (eager count)
    median: float = math.nan    # seconds
    q1: float = math.nan
    q3: float = math.nan
    ratio: float = math.nan     # this form / training: median of the per-pair ratios (nan for training)
    rel_err: float = math.nan   # against the eager fp32 training form
    ops: str = ""               # "convs/BNs" executed (eager count; ONNX Runtime: its optimized graph's nodes)
    error: str = ""

    @property
    def gmacs_per_s(self) -> float:
        return self.macs / self.median / 1e9


def say(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"deploy_matrix: {text}", file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:200]


# ---- preparing a form for a runtime: a callable and the inputs it takes

class OrtRunner:
    """An ONNX Runtime session called like a module on a numpy array."""

    def __init__(self, path: Path, threads: int, device: str):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # not the warning that the saved optimized graph is machine-specific
        optimized = path.with_name(path.stem + f".ort{threads}.onnx")
        options.optimized_model_filepath = str(optimized)  # to count what ORT kept
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime has no {provider} (install onnxruntime-gpu)")
        self.session = ort.InferenceSession(str(path), options, providers=[provider])
        self.name = self.session.get_inputs()[0].name
        counts = onnx_op_counts(optimized)  # Conv, FusedConv, NCHWc Conv, Gemm: reparam.count's convs
        self.convs = sum(n for op, n in counts.items() if any(k in op for k in ("Conv", "Gemm", "MatMul")))
        self.bns = counts.get("BatchNormalization", 0)

    def __call__(self, x):
        return self.session.run(None, {self.name: x})


def prepare(runtime: str, model: nn.Module, x: torch.Tensor, *, threads: int, device: str, onnx_path: Path):
    """(callable, its inputs, (convs, BNs) it runs or None) for `model` (not changed) under `runtime`."""
    rt = RUNTIMES[runtime]
    fmt = torch.channels_last if rt.channels_last else torch.contiguous_format
    if rt.onnx:
        if not onnx_path.exists():  # one export per form, shared by the thread counts
            to_onnx(model, (x,), onnx_path)
        runner = OrtRunner(onnx_path, threads, device)
        return runner, (x.numpy(),), (runner.convs, runner.bns)
    model = copy.deepcopy(model).to(device=device, dtype=rt.dtype, memory_format=fmt)
    xr = x.to(device=device, dtype=rt.dtype, memory_format=fmt)
    if rt.compile:
        import torch._inductor.config as inductor_config
        with inductor_config.patch(freezing=True), torch.no_grad():
            model = torch.compile(model)
            model(xr)  # compiles (and freezes: weights become constants, BNs folded) now
    return model, (xr,), None


@torch.no_grad()
def _output(runner, inputs) -> object:
    out = runner(*inputs)
    out = [torch.from_numpy(o) for o in out] if isinstance(out, list) and out and not torch.is_tensor(out[0]) else out
    return [o.float().cpu() for o in out] if isinstance(out, list) else out.float().cpu()


# ---- the ceiling

def ceiling(device: str, dtype: torch.dtype, runs: int, warmup: int) -> tuple[float, str]:
    """(GMAC/s, description) of one large 3×3 conv, the faster of NCHW and channels-last."""
    c, h, w = (128, 128, 256) if device == "cpu" else (256, 256, 512)
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).eval().to(device=device, dtype=dtype)
    macs = c * c * 9 * h * w
    best = 0.0
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, c, h, w, device=device, dtype=dtype).to(memory_format=fmt)
        m = copy.deepcopy(conv).to(memory_format=fmt)
        latency(m, (x,), warmup=warmup, repeats=1)
        times = [latency(m, (x,), warmup=0, repeats=1)[0] for _ in range(runs)]
        best = max(best, macs / statistics.median(times) / 1e9)
    return best, f"Conv2d({c}, {c}, 3×3) on 1×{c}×{h}×{w}, {macs / 1e9:.2f} GMAC, {str(dtype)[6:]}"


# ---- the matrix

@dataclass
class Prepared:
    name: str
    x: torch.Tensor
    forms: dict[str, nn.Module]       # form → model (eval), training first
    macs: dict[str, float]
    ops: dict[str, tuple[int, int]]   # form → (convs, BNs) one eager forward runs
    errors: dict[str, str]            # form → why it could not be built
    reference: object                 # the eager fp32 training form's output


def build(name: str, size: tuple[int, int] | None, device: str, quiet: bool = False) -> Prepared:
    """The forms of model `name`: training, `reparam.fuse(model, (x,))`, and the spec's extras."""
    spec = MODELS[name]
    size = size or (spec.cuda_size if device == "cuda" and spec.cuda_size else spec.size)
    torch.manual_seed(0)
    model = randomize_norms(spec.build()).eval()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    forms, errors = {TRAINING: model}, {}
    say(f"{name}: fusing with reparam.fuse at 1×3×{size[0]}×{size[1]}", quiet)
    makers = {FUSED: lambda m: reparam.fuse(m, (x,)), **spec.extra_forms}
    for form, make in makers.items():
        try:
            t0 = time.perf_counter()
            forms[form] = make(model)  # reparam.fuse returns an eval-mode model
            say(f"{name}: {form} form built in {time.perf_counter() - t0:.1f} s", quiet)
        except Exception as e:  # noqa: BLE001 -- reported as a row, the matrix goes on
            errors[form] = _reason(e)
    macs, ops = {}, {}
    for form, m in forms.items():
        stats = reparam.count(m, (x,))
        macs[form], ops[form] = stats.macs, (stats.convs, stats.bns)
    with torch.no_grad():
        reference = _output(model, (x,))
    return Prepared(name, x, forms, macs, ops, errors, reference)


def measure(p: Prepared, runtime: str, *, threads: int, device: str, runs: int, warmup: int, workdir: Path,
            quiet: bool = False) -> list[Row]:
    """Rows of every form of `p` under `runtime` at `threads` threads, each form timed interleaved
    with the training form."""
    torch.set_num_threads(threads)
    rt = RUNTIMES[runtime]
    size = tuple(p.x.shape[-2:])
    dtype = str(rt.dtype)[6:]
    rows = {form: Row(threads, p.name, runtime, form, size, dtype, p.macs.get(form, math.nan), error=err)
            for form, err in [(f, "") for f in p.forms] + list(p.errors.items())}
    runners = {}
    for form, model in p.forms.items():
        say(f"{p.name}, {runtime}, {threads} thread(s): preparing the {form} form", quiet)
        try:
            t0 = time.perf_counter()
            runner, inputs, ops = prepare(runtime, model, p.x, threads=threads, device=device,
                                            onnx_path=workdir / f"{p.name}_{size[0]}x{size[1]}_{form}.onnx")
            rows[form].rel_err = rel_error(p.reference, _output(runner, inputs))
            rows[form].ops = "%d/%d" % (p.ops[form] if ops is None else ops)
            runners[form] = (runner, inputs)
            if rt.compile or rt.onnx:
                say(f"  ready in {time.perf_counter() - t0:.1f} s", quiet)
        except Exception as e:  # noqa: BLE001 -- a runtime that fails gives a row with the reason
            rows[form].error = _reason(e)
    if TRAINING in runners:
        training, inputs = runners[TRAINING]
        for form in [f for f in runners if f != TRAINING]:
            say(f"{p.name}, {runtime}, {threads} thread(s): timing {form} and training, {runs} interleaved runs", quiet)
            runner, _ = runners[form]
            with torch.no_grad():  # not inference_mode: a compiled model's guards were made under no_grad
                t_train, t_form = interleaved(training, runner, inputs, warmup=warmup, repeats=runs)
            if not math.isfinite(rows[TRAINING].median):  # the first pair times the training form's row
                rows[TRAINING].median, rows[TRAINING].q1, rows[TRAINING].q3 = quartiles(t_train)
            rows[form].median, rows[form].q1, rows[form].q3 = quartiles(t_form)
            rows[form].ratio = statistics.median(b / a for a, b in zip(t_train, t_form))
    elif runners:
        for form in runners:
            rows[form].error = rows[form].error or "training form failed here: nothing to compare with"
    if rt.compile:
        torch._dynamo.reset()  # Inductor bakes the thread count in: compile afresh for the next one
    return list(rows.values())


def run_matrix(models: list[str], *, threads: list[int], runtimes: list[str], runs: int, warmup: int,
               device: str = "cpu", size: tuple[int, int] | None = None, workdir: Path | None = None,
               quiet: bool = False) -> tuple[list[Row], dict[tuple[int, str], float], str]:
    """(rows, ceiling GMAC/s per (threads, dtype), the ceiling's description)."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="deploy_matrix_")
        workdir = Path(tmp.name)
    rows, ceilings, ceiling_desc = [], {}, ""
    prepared = []
    for name in models:
        try:
            prepared.append(build(name, size, device, quiet))
        except Exception as e:  # noqa: BLE001
            say(f"{name}: could not be built: {_reason(e)}", quiet)
            rows += [Row(t, name, r, TRAINING, size or (0, 0), "", math.nan, error=_reason(e))
                     for t in threads for r in runtimes]
    dtypes = sorted({str(RUNTIMES[r].dtype)[6:] for r in runtimes})
    for t in threads:
        torch.set_num_threads(t)
        for dtype in dtypes:
            say(f"ceiling: one large 3×3 conv, {t} thread(s), {dtype}", quiet)
            ceilings[(t, dtype)], ceiling_desc = ceiling(device, getattr(torch, dtype), max(runs, 5), warmup)
        for p in prepared:
            for runtime in runtimes:
                rows += measure(p, runtime, threads=t, device=device, runs=runs, warmup=warmup,
                                workdir=workdir, quiet=quiet)
    if tmp is not None:
        tmp.cleanup()
    return rows, ceilings, ceiling_desc


# ---- output

def _ms(r: Row) -> str:
    return f"{r.median * 1e3:.1f} ({r.q1 * 1e3:.1f}–{r.q3 * 1e3:.1f})"


def table(rows: list[Row], ceilings: dict) -> str:
    """Markdown: one row per (threads, model, runtime, form), the fused rows carrying the ratio."""
    head = ["threads", "model", "runtime", "form", "latency ms (IQR)", "GMAC", "GMAC/s", "of ceiling",
            "form/training", "rel err", "convs/BNs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.threads} | {r.model} | {r.runtime} | {r.form} | n/a: {r.error} |" + " |" * 6)
            continue
        ceil = ceilings.get((r.threads, r.dtype), math.nan)
        lines.append(f"| {r.threads} | {r.model} | {r.runtime} | {r.form} | {_ms(r)} | {r.macs / 1e9:.2f} | "
                     f"{r.gmacs_per_s:.1f} | {r.gmacs_per_s / ceil:.0%} | "
                     f"{'' if math.isnan(r.ratio) else f'{r.ratio:.2f}'} | {r.rel_err:.1e} | "
                     f"{r.ops} |")
    return "\n".join(lines)


def ratio_table(rows: list[Row]) -> str:
    """Markdown at a glance: fused/training per (model, form, threads) × runtime."""
    runtimes = list(dict.fromkeys(r.runtime for r in rows))
    cells = {(r.model, r.form, r.threads, r.runtime): r for r in rows}
    lines = ["| model | form / training | threads | " + " | ".join(runtimes) + " |",
             "|" + "---|" * (3 + len(runtimes))]
    for model, form, threads in dict.fromkeys((r.model, r.form, r.threads) for r in rows if r.form != TRAINING):
        out = []
        for rt in runtimes:
            r = cells.get((model, form, threads, rt))
            train = cells.get((model, TRAINING, threads, rt))
            out.append("n/a" if r is None or r.error or train is None or train.error else f"{r.ratio:.2f}")
        lines.append(f"| {model} | {form} | {threads} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def header(args, ceilings: dict, ceiling_desc: str) -> str:
    if args.device == "cuda":
        where = f"CUDA: {torch.cuda.get_device_name()}, cudnn.benchmark on"
    else:
        where = f"CPU: {_cpu_name()}, {os.cpu_count()} logical CPU(s)"
    try:
        import onnxruntime
        ort = f"onnxruntime {onnxruntime.__version__} (ORT_ENABLE_ALL, intra-op threads = threads, inter-op 1)"
    except ImportError:
        ort = "onnxruntime not installed"
    dtypes = {rt: str(RUNTIMES[rt].dtype)[6:] for rt in args.runtimes}
    sizes = ", ".join(f"{m} {'×'.join(map(str, args.size or (MODELS[m].cuda_size if args.device == 'cuda' and MODELS[m].cuda_size else MODELS[m].size)))}"
                      for m in args.models)
    notes = [f"note: {m}: {MODELS[m].note}" for m in args.models if MODELS[m].note]
    return "\n".join([
        f"device: {where}; torch {torch.__version__}, {ort}",
        f"threads: {', '.join(map(str, args.threads))} (torch.set_num_threads; ONNX Runtime intra-op)",
        "dtype: " + ", ".join(f"{k} {v}" for k, v in dtypes.items()) + "; batch 1; input (H×W): " + sizes,
        f"protocol: per runtime, {args.warmup} warm-up passes of each form, then {args.runs} interleaved runs "
        "(training, form, form, training, ...), each pass synchronised; latency: median (IQR); "
        "form/training: median of the per-pair ratios; compile: torch.compile (Inductor) with "
        "freezing, under no_grad, compiled before timing",
        f"ceiling: {ceiling_desc}, eager, faster of NCHW and channels-last, median of {max(args.runs, 5)} passes: "
        + ", ".join(f"{t} thread(s) {d} {g:.1f} GMAC/s" for (t, d), g in ceilings.items()),
        *notes])


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 -- only a label
        return platform.processor() or platform.machine()


def write_csv(rows: list[Row], ceilings: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["threads", "model", "runtime", "form", "height", "width", "dtype", "macs", "median_s", "q1_s",
                    "q3_s", "gmacs_per_s", "of_ceiling", "ratio_to_training", "rel_err", "convs_bns", "error"])
        for r in rows:
            ceil = ceilings.get((r.threads, r.dtype), math.nan)
            ok = not r.error
            w.writerow([r.threads, r.model, r.runtime, r.form, *r.size, r.dtype, f"{r.macs:.0f}",
                        *(f"{v:.6f}" if ok else "" for v in (r.median, r.q1, r.q3)),
                        f"{r.gmacs_per_s:.3f}" if ok else "", f"{r.gmacs_per_s / ceil:.4f}" if ok else "",
                        "" if math.isnan(r.ratio) else f"{r.ratio:.4f}", "" if math.isnan(r.rel_err) else f"{r.rel_err:.2e}",
                        r.ops, r.error])
    return path


def plot(rows: list[Row], path: Path, title: str = "") -> Path:
    """One panel per model: latency of each form per runtime and thread count (bars: IQR),
    the form/training ratio written above each non-training bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 2.8 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        mine = [r for r in rows if r.model == model]
        groups = list(dict.fromkeys((r.runtime, r.threads) for r in mine))
        forms = list(dict.fromkeys(r.form for r in mine))
        width = 0.8 / len(forms)
        for i, form in enumerate(forms):
            cells = {(r.runtime, r.threads): r for r in mine if r.form == form}
            xs, ys, lo, hi, labels = [], [], [], [], []
            for g, key in enumerate(groups):
                r = cells.get(key)
                if r is None or r.error or math.isnan(r.median):
                    continue
                xs.append(g + (i - (len(forms) - 1) / 2) * width)
                ys.append(r.median * 1e3)
                lo.append((r.median - r.q1) * 1e3)
                hi.append((r.q3 - r.median) * 1e3)
                labels.append("" if math.isnan(r.ratio) else f"{r.ratio:.2f}")
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=form)
            for bar, text in zip(bars, labels):
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(groups)), [f"{rt}\n{t} thr" for rt, t in groups], fontsize=8)
        ax.set_ylabel("ms (median, IQR)")
        size = mine[0].size
        ax.set_title(f"{model}, 1×3×{size[0]}×{size[1]}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- command line

def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected a size as N or HxW (224, 512x1024), got '{text}'")
    return int(parts[0]), int(parts[1])


def _threads(text: str) -> list[int]:
    values = [v.strip() for v in text.split(",")]
    if not all(v.isdigit() and int(v) > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected thread counts, comma-separated (1,2), got '{text}'")
    return [int(v) for v in values]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Rows grouped by model and runtime; form/training below 1: the fused form is faster.")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=DEFAULT_MODELS,
                   help=f"default: {' '.join(DEFAULT_MODELS)} (add gcnet_m gcnet_l for GCNet-M and L)")
    p.add_argument("--size", type=_size, default=None,
                   help="input N or HxW for every model (default: GCNet 512x1024, 1024x2048 on CUDA; timm 224; YOLO 640)")
    p.add_argument("--threads", type=_threads, default=None, help="comma-separated, e.g. 1,2 (default: torch's)")
    p.add_argument("--runs", type=int, default=10, help="timed interleaved pairs per model, runtime and form")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes of each form first")
    p.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), default=None,
                   help=f"default: {' '.join(CPU_RUNTIMES)}; on CUDA also eager-fp16")
    p.add_argument("--out", type=Path, default=Path("runs/deploy_matrix"), help="folder for the CSV and PNG")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.threads = args.threads or [torch.get_num_threads()]
    args.runtimes = args.runtimes or (CUDA_RUNTIMES if args.device == "cuda" else CPU_RUNTIMES)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    rows, ceilings, desc = run_matrix(args.models, threads=args.threads, runtimes=args.runtimes, runs=args.runs,
                                      warmup=args.warmup, device=args.device, size=args.size, quiet=args.quiet)
    print(header(args, ceilings, desc), end="\n\n")
    print(ratio_table(rows), end="\n\n")
    print(table(rows, ceilings), end="\n\n")
    stem = args.out / f"deploy_matrix_{args.device}"
    csv_path = write_csv(rows, ceilings, stem.with_suffix(".csv"))
    png = plot(rows, stem.with_suffix(".png"), f"training vs reparam.fuse form per runtime ({args.device}; "
               "label: form/training latency)")
    print(f"wrote {csv_path} and {png} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
