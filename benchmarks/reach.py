"""How far `reparam.fuse` reaches on Ultralytics and segmentation-models-pytorch models, against
each library's own converter.

    YOLO_OFFLINE=1 python benchmarks/reach.py --models yolov8n yolo11n smp-fpn-repvgg_a0
    YOLO_OFFLINE=1 python benchmarks/reach.py --skip-slow --csv reach.csv
    YOLO_OFFLINE=1 python benchmarks/reach.py --profile yolov8n given

Every model is built from its config with random weights (nothing is downloaded), its BatchNorm
statistics and affine parameters randomized (`examples.blocks.randomize_norms`: a fresh BN is the
identity in eval mode and would hide a wrong fold), and put in eval mode. For each model and mode
(`none`: `reparam.fuse(model)`; `given`: `reparam.fuse(model, (x,))`), one row:

- convs/BNs: conv (and linear) ops and batch-norm ops one forward on x runs
  (`reparam.stats.count(m, (x,))`), for the original, reparam's result and the converter's result.
  Ops run, not modules held, so a branch a converter deletes because eval never runs it (the
  training-only semantic head of YOLO26's Proto26) does not count for either side.
- rel err: `reparam.testing.rel_error` (max |a - b| / max |a| per output tensor, worst over all
  tensors of the output, raw predictions included) against the original on x.
- t_reparam, t_converter: fusion time, best of --repeats, one thread, including the deep copy
  each makes of the model (both leave the original untouched).
- ratio: t_reparam / t_converter.
- cpu_*: the same as CPU time of the process (`time.process_time`): on a machine shared with
  other jobs, wall time also counts the time the process waited for a core.

Converters:
- Ultralytics: `copy.deepcopy(model).fuse(verbose=False)` (conv+BN, RepConv, RepVGGDW), with
  `Detect.fuse` kept from deleting the one-to-many head of end-to-end heads (YOLOv10, YOLO26);
  see `ultralytics_fuse`.
- smp with a timm encoder (`tu-*`): `timm.utils.model.reparameterize_model(model)` on the whole
  smp model: it walks every child and calls `fuse()` / `reparameterize()` / `switch_to_deploy()`
  wherever a block has one (the encoder's MobileOne/RepVGG/RepViT blocks; smp's decoder
  Conv2dReLU conv+BN has none, so it stays).
- smp's own MobileOne encoder (`mobileone_s*`): smp's
  `segmentation_models_pytorch.encoders.mobileone.reparameterize_model(model)` (a deep copy, then
  `reparameterize()` on every module that has it).

Each row runs in its own subprocess (`--one NAME MODE`, which prints one JSON line), under
--timeout seconds: a crash or a hang costs its row, never the table. Progress goes to stderr, the
markdown table to stdout.

`--profile NAME MODE` runs `reparam.fuse` once under cProfile and prints seconds per phase; see
`profile_phases` for how they are computed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: this checkout's reparam, and `examples`

import torch  # noqa: E402

# name -> (library, builder arguments). Ultralytics: (task model class, yaml); smp: (arch, encoder).
MODELS = {
    "yolov8n": ("ultralytics", ("DetectionModel", "yolov8n.yaml")),
    "yolov6n": ("ultralytics", ("DetectionModel", "yolov6n.yaml")),
    "yolov9t": ("ultralytics", ("DetectionModel", "yolov9t.yaml")),
    "yolov10n": ("ultralytics", ("DetectionModel", "yolov10n.yaml")),
    "yolo11n": ("ultralytics", ("DetectionModel", "yolo11n.yaml")),
    "yolo12n": ("ultralytics", ("DetectionModel", "yolo12n.yaml")),
    "yolo26n": ("ultralytics", ("DetectionModel", "yolo26n.yaml")),
    "yolov8n-seg": ("ultralytics", ("SegmentationModel", "yolov8n-seg.yaml")),
    "yolo26n-sem": ("ultralytics", ("SemanticSegmentationModel", "yolo26n-sem.yaml")),
    "yolov8n-cls": ("ultralytics", ("ClassificationModel", "yolov8n-cls.yaml")),
    "rtdetr-l": ("ultralytics", ("RTDETRDetectionModel", "rtdetr-l.yaml")),
    "smp-unet-mobileone_s0": ("smp", ("Unet", "mobileone_s0")),
    "smp-fpn-repvgg_a0": ("smp", ("FPN", "tu-repvgg_a0")),
    "smp-segformer-mobileone_s1": ("smp", ("Segformer", "mobileone_s1")),
    "smp-upernet-repvit_m0_9": ("smp", ("UPerNet", "tu-repvit_m0_9")),
    "smp-linknet-mobileone_s0": ("smp", ("Linknet", "tu-mobileone_s0")),
}
SLOW = {"rtdetr-l"}  # the largest (27 minutes with example inputs before stop 19; now about 10 s)
MODES = ("none", "given")
SMP_SIZE = 256


# ---- building ----

def build(name: str, size: int, seed: int = 0):
    """(eval-mode model with random weights and BN statistics, input x, converter function)."""
    from examples.blocks import randomize_norms
    library, (arch, cfg) = MODELS[name]
    torch.manual_seed(seed)
    if library == "ultralytics":
        from ultralytics.nn import tasks
        cls = getattr(tasks, arch, None)
        if cls is None:
            raise RuntimeError(f"ultralytics {_version('ultralytics')} has no {arch}")
        model = cls(cfg, verbose=False)
        x_size, convert = size, ultralytics_fuse
    else:
        import segmentation_models_pytorch as smp
        model = getattr(smp, arch)(encoder_name=cfg, encoder_weights=None, classes=2)
        x_size, convert = SMP_SIZE, smp_converter(cfg)
    x = torch.randn(1, 3, x_size, x_size, generator=torch.Generator().manual_seed(seed))
    return randomize_norms(model, seed).eval(), x, convert


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


@contextlib.contextmanager
def _keep_one2many():
    """Ultralytics' `Detect.fuse` deletes the branch eval does not decode: for an end-to-end head
    (YOLOv10, YOLO26) that is the one-to-many head (`cv2`, `cv3`, and `cv4` of Segment/Pose/OBB set
    to None). The eval model returns `(decoded, raw)` where `raw` holds both heads' raw predictions,
    so after that deletion `raw["one2many"]` is `{}`: a different output, which no error can be
    measured against (and two heads' worth of convs fewer to count). `reparam.fuse` must keep what
    the model returns, so we compare with Ultralytics' fuse with that deletion skipped: `Detect.fuse`
    (which `Segment.fuse` etc. reach through `super().fuse()`) is a no-op while `BaseModel.fuse`
    runs, and every Conv+BN in both heads is folded as usual (BaseModel.fuse visits them because
    the head keeps them). For a head that is not end-to-end `Detect.fuse` only deletes `one2one_*`
    attributes it does not have, so nothing changes there. Proto26's own `fuse` (dropping the
    training-only `semseg` branch) still runs: eval never calls it."""
    from ultralytics.nn.modules.head import Detect
    original = Detect.fuse
    Detect.fuse = lambda self: None
    try:
        yield
    finally:
        Detect.fuse = original


def ultralytics_fuse(model):
    with _keep_one2many():
        return copy.deepcopy(model).fuse(verbose=False)


def smp_converter(encoder: str):
    if encoder.startswith("tu-"):
        from timm.utils.model import reparameterize_model
        return reparameterize_model  # deep copies (inplace=False)
    if encoder.startswith("mobileone"):
        from segmentation_models_pytorch.encoders.mobileone import reparameterize_model
        return reparameterize_model  # deep copies
    raise ValueError(f"no converter known for smp encoder {encoder}")


# ---- one row ----

def _best(fn, repeats: int):
    """(fn's result, best wall seconds, best CPU seconds of this process) over `repeats` runs."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, min(walls), min(cpus)


@torch.no_grad()
def one_row(name: str, mode: str, size: int, repeats: int) -> dict:
    import reparam
    from reparam.testing import rel_error
    torch.set_num_threads(1)
    model, x, convert = build(name, size)
    inputs = (x,) if mode == "given" else None
    want = model(x.clone())
    original = reparam.count(model, (x.clone(),))
    ours, t_ours, cpu_ours = _best(lambda: reparam.fuse(model, inputs), repeats)
    theirs, t_theirs, cpu_theirs = _best(lambda: convert(model), repeats)
    row = {"model": name, "mode": mode, "x": list(x.shape)}
    for key, m in (("reparam", ours), ("converter", theirs)):
        stats = reparam.count(m, (x.clone(),))
        row[key] = f"{stats.convs}/{stats.bns}"
        try:
            row[f"err_{key}"] = rel_error(want, m(x.clone()))
        except AssertionError as e:  # different output structure or shapes
            row[f"err_{key}"] = f"differs: {e}"
    row.update(original=f"{original.convs}/{original.bns}", t_reparam=t_ours, t_converter=t_theirs,
               ratio=t_ours / t_theirs if t_theirs > 0 else float("inf"), cpu_reparam=cpu_ours,
               cpu_converter=cpu_theirs, cpu_ratio=cpu_ours / cpu_theirs if cpu_theirs > 0 else float("inf"))
    return row


def run_row(name: str, mode: str, args) -> dict:
    """`one_row` in a subprocess under args.timeout: a crash or hang costs this row only."""
    cmd = [sys.executable, __file__, "--one", name, mode, "--size", str(args.size), "--repeats", str(args.repeats)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": name, "mode": mode, "status": f"timeout ({args.timeout:g} s)"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": name, "mode": mode, "status": f"error: {tail[:200]}"}
    row = json.loads(lines[-1])
    row["wall"] = time.perf_counter() - t0
    return row


COLUMNS = ["model", "mode", "convs/BNs original", "reparam", "converter", "rel err reparam",
           "rel err converter", "t_reparam s", "t_converter s", "ratio", "cpu_reparam s", "cpu_converter s",
           "cpu ratio"]


def _err(v) -> str:
    return f"{v:.1e}" if isinstance(v, float) else str(v)


def cells(row: dict) -> list[str]:
    if "status" in row:
        return [row["model"], row["mode"], row["status"]] + [""] * (len(COLUMNS) - 3)
    return [row["model"], row["mode"], row["original"], row["reparam"], row["converter"],
            _err(row["err_reparam"]), _err(row["err_converter"]), f"{row['t_reparam']:.2f}",
            f"{row['t_converter']:.3f}", _ratio(row["ratio"]), f"{row['cpu_reparam']:.2f}",
            f"{row['cpu_converter']:.3f}", _ratio(row["cpu_ratio"])]


def _ratio(r: float) -> str:
    return f"{r:.0f}×" if r >= 10 else f"{r:.1f}×"


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


# ---- profile ----

# phase -> predicate on (file, function). Files are matched as path suffixes / fragments.
def _phase_of(filename: str, func: str) -> str | None:
    f = filename.replace(os.sep, "/")
    if "/torch/fx/passes/shape_prop.py" in f:
        return "shape propagation (ShapeProp)"
    if f.endswith("/torch/fx/graph_module.py") and func in ("recompile", "_recompile"):
        return "recompile (GraphModule.recompile)"
    if "/reparam/" in f:
        mod = f.rsplit("/reparam/", 1)[1]
        if mod in ("trace.py", "mutation.py", "export.py"):
            return "tracing (reparam.trace/mutation → fx, export)"
        if mod.startswith("rules/") or mod in ("ops.py", "algebra.py"):
            return "rules (reparam.rules, ops, algebra)"
        if mod == "check.py":
            return "self-check (reparam.check)"
        if mod == "fuse.py" and func in ("_run", "_differ"):
            return "whole-model check (fuse._run/_differ)"
        if mod == "fuse.py" and func == "_bisect":
            return "bisection (fuse._bisect)"
        if mod == "usage.py":
            return "usage (reparam.usage)"
    return None


PHASES = ["tracing (reparam.trace/mutation → fx, export)", "shape propagation (ShapeProp)",
          "rules (reparam.rules, ops, algebra)", "self-check (reparam.check)",
          "whole-model check (fuse._run/_differ)", "bisection (fuse._bisect)",
          "recompile (GraphModule.recompile)", "usage (reparam.usage)"]
# where a sample's stack holds several phases, the innermost wins, except that the graph
# library (ops, algebra), which every phase reads through, only wins when no other phase is on it
_WEAK = "rules (reparam.rules, ops, algebra)"


class _Sampler:
    """Samples the main thread's Python stack every `interval` s: the innermost phase on it."""

    def __init__(self, thread_id: int, interval: float = 0.02):
        import threading
        self.thread_id, self.interval, self.counts = thread_id, interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            found = None
            while frame is not None:
                p = _phase_of(frame.f_code.co_filename, frame.f_code.co_name)
                if p is not None and p != _WEAK:
                    found = p
                    break
                if p == _WEAK and found is None:
                    found = p
                frame = frame.f_back
            found = found or "other"
            self.counts[found] = self.counts.get(found, 0) + 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def profile_phases(name: str, mode: str, size: int) -> str:
    """Seconds per phase of one `reparam.fuse`, two ways, from one run:

    Both are CPU seconds of the process (cProfile runs on `time.process_time`; the samples, taken
    in wall time, are scaled to the CPU total), as a shared machine inflates wall time.

    - inclusive (cProfile): for each phase, the cumulative time of the calls into its functions
      from functions outside it (the caller→callee edges of pstats), so a phase's function
      calling another of the same phase is not counted twice. Phases nest, so these overlap and
      do not add up to the total: bisection re-fuses (tracing, rules, self-check, recompile
      inside it) and runs the model (whole-model check inside it); tracing recompiles.
    - innermost (sampling, every 20 ms, alongside cProfile): the share of samples whose innermost
      phase frame is that phase (ops/algebra count as rules only where no other phase is on the
      stack), times the CPU total. These add up to the total with `other` (engine loop,
      fuse's own code, counting forwards, the deep copy).
    cProfile slows Python-heavy phases more than tensor-heavy ones; both columns carry that."""
    import cProfile
    import pstats
    import threading
    import reparam
    torch.set_num_threads(1)
    model, x, _ = build(name, size)
    inputs = (x,) if mode == "given" else None
    prof = cProfile.Profile(time.process_time)  # CPU seconds: the machine may be shared
    with _Sampler(threading.get_ident()) as sampler:
        t0, c0 = time.perf_counter(), time.process_time()
        prof.enable()
        reparam.fuse(model, inputs)
        prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = pstats.Stats(prof).stats  # (file, line, func) -> (cc, nc, tt, ct, callers)
    inclusive = dict.fromkeys(PHASES, 0.0)
    for (file, _, func), (_, _, _, _, callers) in stats.items():
        phase = _phase_of(file, func)
        if phase is None:
            continue
        for (cfile, _, cfunc), edge in callers.items():
            if _phase_of(cfile, cfunc) != phase:
                inclusive[phase] += edge[3]
    total = sum(sampler.counts.values()) or 1
    lines = [f"profile: {name}, mode {mode}, input {tuple(x.shape)}, one thread; "
             f"reparam.fuse took {wall:.2f} s wall, {cpu:.2f} s CPU under cProfile ({total} samples)",
             "", "| phase | inclusive s (cProfile) | innermost s (sampled) |", "|---|---|---|"]
    for p in PHASES + ["other"]:
        inc = f"{inclusive[p]:.2f}" if p in inclusive else ""
        lines.append(f"| {p} | {inc} | {cpu * sampler.counts.get(p, 0) / total:.2f} |")
    lines.append(f"| total (CPU) | {cpu:.2f} | {cpu:.2f} |")
    return "\n".join(lines)


# ---- main ----

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="models: " + ", ".join(MODELS))
    p.add_argument("--models", nargs="+", metavar="NAME", help="a subset of the models (default: all)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--size", type=int, default=320, help="YOLO input height and width (smp: 256)")
    p.add_argument("--repeats", type=int, default=1, help="fusion time: best of this many runs")
    p.add_argument("--skip-slow", action="store_true", help="leave out " + ", ".join(sorted(SLOW)))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per row (its own process)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--one", nargs=2, metavar=("NAME", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--profile", nargs=2, metavar=("NAME", "MODE"),
                   help="cProfile one reparam.fuse and print seconds per phase")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_row(*args.one, args.size, args.repeats)), flush=True)
        return 0
    if args.profile:
        print(profile_phases(*args.profile, args.size))
        return 0
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    if args.skip_slow:
        names = [n for n in names if n not in SLOW]
    import reparam
    import segmentation_models_pytorch as smp
    import timm
    print(f"reparam from {Path(reparam.__file__).parent}; torch {torch.__version__}, ultralytics "
          f"{_version('ultralytics')}, smp {smp.__version__}, timm {timm.__version__}; one thread; "
          f"YOLO input 1×3×{args.size}×{args.size}, smp 1×3×{SMP_SIZE}×{SMP_SIZE}; "
          f"fusion time best of {args.repeats}; timeout {args.timeout:g} s per row")
    rows = []
    for name in names:
        for mode in args.modes:
            row = run_row(name, mode, args)
            rows.append(row)
            status = row.get("status") or (f"reparam {row['reparam']} err {_err(row['err_reparam'])}, "
                                           f"converter {row['converter']} err {_err(row['err_converter'])}, "
                                           f"{row['wall']:.0f} s")
            print(f"{name} {mode}: {status}", file=sys.stderr, flush=True)
    print()
    print(table(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows(cells(r) for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
