"""`reparam report`: the three model spellings, --kwargs, one-line errors (exit 2), --version,
--threads, progress only on a terminal, the block-grouped report and --health."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reparam import __version__, cli

TINY = ["--input-shape", "1,3,32,32", "--repeats", "2", "--warmup", "0", "--threads", "1"]


def tiny_net(num_classes: int = 4, width: int = 4) -> nn.Module:
    """A factory for the PACKAGE.MODULE:FACTORY spelling (this test module is importable)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def run(capsys, *argv):
    """(exit status, stdout, stderr); argparse's own errors exit by SystemExit."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("spec, kwargs", [
    ("test_cli:tiny_net", "num_classes=three"),
    ("test_cli:tiny_net", "num_classes=3,width=len([1])"),
    ("test_cli:tiny_net", "4"),
])
def test_kwargs_must_be_literals(spec, kwargs, capsys):
    code, _, err = run(capsys, "report", spec, "--kwargs", kwargs, *TINY)
    assert code == 2 and err.startswith("reparam: error: argument --kwargs: ") and err.count("\n") == 1


def test_parse_kwargs_reads_python_literals():
    assert cli.parse_kwargs("num_classes=10,pretrained=False,img_size=(224, 224),name='a,b'") == {
        "num_classes": 10, "pretrained": False, "img_size": (224, 224), "name": "a,b"}
    assert cli.parse_kwargs("") == {}


def test_factory_spelling_with_kwargs(capsys):
    code, out, _ = run(capsys, "report", "test_cli:tiny_net", "--kwargs", "num_classes=7", *TINY)
    assert code == 0
    assert "1 CPU thread(s)" in out and "interleaved" in out and "IQR" in out
    assert "linear layers" in out
    assert "1 rewrites (merge_sequential 1)" in out or "rewrites (" in out


@pytest.mark.parametrize("spec, kwargs, classes", [
    ("timm:repvgg_a0", "num_classes=5,pretrained=False", 5),
    ("torchvision:resnet18", "num_classes=6", 6),
])
def test_registry_spellings_build_what_they_name(spec, kwargs, classes):
    pytest.importorskip(spec.split(":")[0])
    model = cli.build(spec, cli.parse_kwargs(kwargs))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, classes)


def test_timm_report_groups_blocks_and_reports_health(capsys):
    pytest.importorskip("timm")
    code, out, _ = run(capsys, "report", "timm:repvgg_a0", "--kwargs", "num_classes=3", "--health", *TINY)
    assert code == 0
    assert "stages.1.1 (RepVggBlock): 2 convs + 3 BNs → 1 conv 3×3, 96→96" in out
    assert "stages.1.1.reparam" in out.split("deployment health")[1]
    assert "worst int8 per-channel error" in out


def test_verbose_lists_rewrites_with_named_shapes(capsys):
    code, out, _ = run(capsys, "report", "test_cli:tiny_net", "-v", *TINY)
    assert code == 0 and "Conv2d out 4, in 3, k 3×3" in out


@pytest.mark.parametrize("argv, message", [
    (["report", "resnet50"], "expected timm:NAME, torchvision:NAME or PACKAGE.MODULE:FACTORY"),
    (["report", "timm:create_model"], "timm has no model 'create_model'"),
    (["report", "no_such_package_xyz:f"], "cannot import 'no_such_package_xyz'"),
    (["report", "test_cli:nothing_here"], "'test_cli' has no callable 'nothing_here'"),
    (["report", "test_cli:tiny_net", "--kwargs", "colour=3"], "test_cli:tiny_net(colour=3) failed: TypeError"),
    (["report", "test_cli:tiny_net", "--input-shape", "1,3,224"],
     "test_cli:tiny_net fails on --input-shape 1,3,224: RuntimeError"),
    (["report", "test_cli:tiny_net", "--input-shape", "1,3,x"], "argument --input-shape: expected comma-separated"),
    (["report", "test_cli:tiny_net", "--threads", "0"], "argument --threads: expected a whole number"),
])
def test_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    code, out, err = run(capsys, *argv, "--repeats", "1")
    assert code == 2 and out == ""
    assert err.startswith("reparam: error: ") and message in err and err.count("\n") == 1, err


def test_debug_shows_the_traceback():
    with pytest.raises(cli.UsageError, match="fails on --input-shape") as info:
        cli.main(["report", "test_cli:tiny_net", "--input-shape", "1,3,224", "--debug"])
    assert isinstance(info.value.__cause__, RuntimeError)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"reparam {__version__}"


def test_help_shows_the_three_spellings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    out = capsys.readouterr().out
    assert all(s in out for s in ("timm:repvgg_a0", "torchvision:resnet50", "PACKAGE.MODULE:FACTORY", "--kwargs"))


def test_progress_on_a_terminal_only_and_never_with_quiet(capsys, monkeypatch):
    assert run(capsys, "report", "test_cli:tiny_net", *TINY)[2] == ""  # captured stderr: not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert "reparam: fusing" in run(capsys, "report", "test_cli:tiny_net", *TINY)[2]
    assert run(capsys, "report", "test_cli:tiny_net", "--quiet", *TINY)[2] == ""


@pytest.mark.parametrize("timm_init, message", [
    (None, "'timm:repvgg_a0' needs timm: pip install timm"),  # not installed
    ("import no_such_dependency_xyz\n", "'timm:repvgg_a0': importing timm failed: No module named "
                                        "'no_such_dependency_xyz'"),  # installed, a dependency missing
])
def test_a_missing_registry_package_is_one_line(timm_init, message, capsys, monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    if timm_init is None:
        monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ModuleNotFoundError('timm')
    else:
        (tmp_path / "timm").mkdir()
        (tmp_path / "timm" / "__init__.py").write_text(timm_init)
        monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(capsys, "report", "timm:repvgg_a0", "--repeats", "1")
    assert code == 2 and out == "" and err == f"reparam: error: {message}\n"


def test_fuse_bench_takes_the_report_spellings_and_errors(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `benchmarks`
    from benchmarks import fuse_bench
    argv = ["test_cli:tiny_net", "--kwargs", "num_classes=7", "--input-shape", "1,3,16,16", "--threads", "1",
            "--fuse-repeats", "1", "--repeats", "2", "--min-time", "0"]
    assert fuse_bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "test_cli:tiny_net  input (1, 3, 16, 16) float32 on cpu, 1 CPU thread(s)" in out
    assert "speed-up:" in out and "interleaved" in out
    assert fuse_bench.main(["test_cli:tiny_net", "--kwargs", "colour=3"]) == 2
    assert capsys.readouterr().err.startswith("fuse_bench: error: test_cli:tiny_net(colour=3) failed: TypeError")
    assert fuse_bench.main(["resnet50"]) == 2
    assert "fuse_bench: error: expected timm:NAME, torchvision:NAME" in capsys.readouterr().err
