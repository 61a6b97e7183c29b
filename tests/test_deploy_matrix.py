"""benchmarks/deploy_matrix.py on a tiny two-block RepVGG at 16×16, one thread, two runs: every
runtime gives a row per form, the fused form agrees with the training form in each runtime, and
the tables, CSV and plot have their structure. A runtime that fails gives a row with its reason."""
import argparse
import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root, for `examples`

from examples.blocks import RepVGGBlock  # noqa: E402

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
_spec = importlib.util.spec_from_file_location("deploy_matrix", ROOT / "benchmarks" / "deploy_matrix.py")
dm = sys.modules["deploy_matrix"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(dm)

# torch.compile of this model (two forms, Inductor with freezing) takes about 30 s on two cores
RUNTIMES = ["eager", "channels-last", "compile", "onnxruntime"]


def tiny() -> nn.Module:
    return nn.Sequential(RepVGGBlock(3, 8), RepVGGBlock(8, 8))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setitem(dm.MODELS, "tiny", dm.ModelSpec(tiny, (16, 16)))
    workdir = tmp_path_factory.mktemp("deploy_matrix")
    rows, ceilings, desc = dm.run_matrix(["tiny"], threads=[1], runtimes=RUNTIMES, runs=2, warmup=1,
                                         workdir=workdir, quiet=True)
    yield rows, ceilings, desc, workdir
    mp.undo()


def test_every_runtime_and_form_has_a_row(matrix):
    rows, ceilings, desc, _ = matrix
    assert [(r.runtime, r.form) for r in rows] == [(rt, f) for rt in RUNTIMES for f in ("training", "fused")]
    assert all(not r.error for r in rows), [r.error for r in rows if r.error]
    assert set(ceilings) == {(1, "float32")} and ceilings[(1, "float32")] > 0 and "3×3" in desc
    for r in rows:
        assert r.threads == 1 and r.size == (16, 16) and r.dtype == "float32"
        assert r.q1 <= r.median <= r.q3 and r.median > 0
        assert (r.form == "training") == math.isnan(r.ratio)
    fused = [r for r in rows if r.form == "fused"]
    assert all(0 < r.ratio < math.inf for r in fused)
    # the 1×1 branches are gone: fewer MACs, two convs, no BN (eager count and ONNX Runtime's graph)
    assert all(r.macs < rows[0].macs for r in fused)
    assert {r.ops for r in fused} == {"2/0"}


def test_fused_and_training_agree_in_each_runtime(matrix):
    rows = matrix[0]
    for r in rows:  # against the eager training form: both forms, every runtime
        assert r.rel_err < 1e-5, (r.runtime, r.form, r.rel_err)


def test_tables_csv_and_plot(matrix):
    rows, ceilings, _, workdir = matrix
    lines = dm.table(rows, ceilings).splitlines()
    assert len(lines) == 2 + len(rows)
    assert {line.count("|") for line in lines} == {12}
    glance = dm.ratio_table(rows).splitlines()
    assert glance[0] == "| model | form / training | threads | " + " | ".join(RUNTIMES) + " |"
    assert len(glance) == 3 and glance[2].startswith("| tiny | fused | 1 | ")
    assert all(float(cell) > 0 for cell in glance[2].strip("| ").split(" | ")[3:])
    path = dm.write_csv(rows, ceilings, workdir / "out" / "m.csv")
    with open(path) as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows) and all(float(rec["median_s"]) > 0 and not rec["error"] for rec in records)
    assert all(float(rec["ratio_to_training"]) > 0 for rec in records if rec["form"] == "fused")
    png = dm.plot(rows, workdir / "out" / "m.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_runtime_gives_a_row_with_its_reason(matrix, monkeypatch):
    workdir = matrix[3]

    class NoOrt:
        def __init__(self, *args, **kwargs):
            raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(dm, "OrtRunner", NoOrt)  # the ONNX files are in workdir already: no export
    monkeypatch.setitem(dm.MODELS, "tiny", dm.ModelSpec(tiny, (16, 16)))
    p = dm.build("tiny", None, "cpu", quiet=True)
    rows = dm.measure(p, "onnxruntime", threads=1, device="cpu", runs=1, warmup=0, workdir=workdir, quiet=True)
    assert [(r.form, r.error) for r in rows] == [(f, "ImportError: No module named 'onnxruntime'")
                                                for f in ("training", "fused")]
    assert "n/a: ImportError" in dm.table(rows, {})
    assert "| n/a |" in dm.ratio_table(rows)


def test_arguments():
    args = dm.parse_args(["--models", "repvgg_a0", "--size", "64", "--threads", "1,2", "--device", "cpu"])
    assert args.size == (64, 64) and args.threads == [1, 2] and args.runtimes == dm.CPU_RUNTIMES
    assert dm._size("512x1024") == (512, 1024)
    for bad in ("0", "512x", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            dm._size(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        dm._threads("1,0")
    assert dm.parse_args(["--device", "cuda"]).runtimes == dm.CUDA_RUNTIMES

