"""The `gcnet` command line: subcommand discovery, info, bench, convert, errors, extras, --version."""
import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gcnet import GCNET_S, bench, cli, gcnet_s
from gcnet import checkpoint as ck
from gcnet.model import FACTORIES

from test_gcnet_checkpoint import SMALL, random_release_state_dict


@pytest.fixture
def small_s(monkeypatch):
    """`--variant s` builds a narrow GCNet-S: the commands' wiring, not the model, is under test."""
    monkeypatch.setitem(FACTORIES, "s", lambda n_paths=2: gcnet_s(n_paths=n_paths, **SMALL))


def test_help_lists_the_commands_whose_modules_exist(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("info", "bench", "convert"))


def test_only_absent_modules_are_skipped(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("gcnet.info", "gcnet.no_such_command"))
    assert "info" in cli.build_parser().format_help()
    (tmp_path / "broken_command.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("gcnet.info", "broken_command"))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        cli.build_parser()


def test_info_prints_training_and_deploy_counts_beside_the_paper(capsys):
    assert cli.main(["info", "--variant", "s", "--size", "1024", "2048"]) == 0
    out = capsys.readouterr().out
    assert "9.169 M" in out and "45.106" in out  # deploy form, GCNET.md's exact counts
    assert "20.695 M" in out  # training form, auxiliary head included
    assert "9.2 M / 45.2" in out  # Table 3


def test_bench_sweep_writes_csv_and_plot(small_s, tmp_path, capsys):
    assert cli.main(["bench", "--variant", "s", "--sizes", "32x64,64x128", "--warmup", "0",
                     "--repeats", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "protocol ours: 0 warm-up passes, then per-pass timing" in out and "interquartile range" in out
    with open(tmp_path / "gcnet_s_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["protocol"], r["form"], r["setting"], r["height"]) for r in rows] == [
        ("ours", form, "fp32", h) for h in ("32", "64") for form in ("fused", "training")]
    assert all(0 < float(r["fps_low"]) <= float(r["fps"]) <= float(r["fps_high"]) for r in rows)
    assert (tmp_path / "gcnet_s_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_prints_both_protocols_and_labels_the_release_form(small_s, capsys):
    assert cli.main(["bench", "--sizes", "32x64", "--protocol", "both", "--forms", "fused", "release",
                     "--warmup", "1", "--repeats", "2", "--seconds", "0.01", "--builds", "2"]) == 0
    out = capsys.readouterr().out
    ours, release = out.split("protocol release: ")
    assert "protocol ours: 1 warm-up passes" in ours
    assert release.startswith("the release's speed script (its own runs: fp32): 1 warm-up passes, "
                              "back-to-back passes over 0.01 s with one synchronisation at each end")
    assert "mean of 2 builds" in release
    errors = set()
    for part in (ours, release):
        assert "fused" in part
        label = re.search(r"release = as the release times it — not exact, rel err (\d+\.\d+) against", part)
        errors.add(float(label.group(1)))
    [error] = errors
    assert error == round(bench.release_form_error("s"), 2) and error > 0.1  # measured, and far from exact


def test_bench_settings_columns_on_the_cpu(small_s, capsys):
    timings = bench.bench("s", [(32, 64)], forms=("fused",), settings=("fp32", "fp16", "bf16", "channels-last",
                          "compile"), warmup=0, repeats=1, compile_backend="eager")  # eager: no compiler needed
    assert [t.setting for t in timings] == ["fp32", "fp16", "bf16", "channels-last", "compile"]
    assert all((t.fps > 0) != bool(t.error) for t in timings)  # a number, or n/a with its reason
    assert not any(t.error for t in timings if t.setting in ("fp32", "bf16", "channels-last", "compile"))
    assert "n/a" not in bench.table(timings) or "n/a fp16:" in bench.table(timings)


class _Recorder(torch.nn.Module):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def forward(self, x):
        self.events.append("pass" if torch.backends.cudnn.benchmark else "pass without cudnn.benchmark")
        return x


def test_release_protocol_synchronises_once_at_each_end(monkeypatch):
    events = []
    monkeypatch.setattr(bench, "_synchronize", lambda device: events.append("sync"))
    bench.throughput(_Recorder(events), torch.zeros(1), warmup=10, seconds=0.01)
    assert events[:11] == ["pass"] * 10 + ["sync"]  # 10 warm-up passes first
    assert events[-1] == "sync"
    start = max(i for i in range(len(events) - 1) if events[i] == "sync")
    assert len(events) - start - 2 >= 1 and set(events[start + 1:-1]) == {"pass"}  # the timed run: n passes


def test_our_protocol_synchronises_after_each_pass(monkeypatch):
    import reparam.stats
    events = []
    monkeypatch.setattr(reparam.stats, "_sync", lambda device: events.append("sync"))
    monkeypatch.setattr(bench, "build_form", lambda form, variant, n_paths: _Recorder(events))
    before = torch.backends.cudnn.benchmark
    [timing] = bench.bench("s", [(4, 4)], forms=("fused",), warmup=3, repeats=5)
    assert torch.backends.cudnn.benchmark == before  # restored
    assert events[:6] == ["pass"] * 3 + ["sync", "pass", "sync"]  # warm-up (its timed pass discarded)
    assert events[6:] == ["sync", "pass", "sync"] * 5  # each timed pass between two synchronisations
    assert timing.fps_low <= timing.fps <= timing.fps_high


def test_convert_cli_success(tmp_path, capsys):
    path = tmp_path / "release.pth"
    torch.save({"state_dict": random_release_state_dict(GCNET_S)}, path)
    assert cli.main(["convert", str(path), "--out", str(tmp_path / "s.safetensors")]) == 0
    assert "wrote" in (out := capsys.readouterr().out) and "GCNet-S, n_paths=2, 19 classes" in out
    assert ck.load(tmp_path / "s.safetensors").config == GCNET_S

FIXTURE = Path(__file__).parent / "data" / "gcnet-release" / "release_s_c8_deploy.pth"
BAD_FILES = {"empty.pth": b"", "truncated.pth": FIXTURE.read_bytes()[:100_000], "garbage.pth": b"\x80\x02}q" * 30,
             "garbage.safetensors": b"\xff" * 100, "missing.pth": None}
COMMANDS = {  # each reads the weights file it is given, and nothing else first
    "convert": lambda f, tmp: ["convert", f, "--out", str(tmp / "out.safetensors")],
    "eval": lambda f, tmp: ["eval", f, "--workers", "0"],
    "predict": lambda f, tmp: ["predict", str(tmp / "image.png"), "--weights", f, "--out", str(tmp / "pred")],
    "export": lambda f, tmp: ["export", "--checkpoint", f, "--out", str(tmp / "m.onnx"), "--size", "64", "64"],
    "train --resume": lambda f, tmp: ["train", "--resume", f],
    "train --init-from": lambda f, tmp: ["train", "--dataset", "demo", "--init-from", f, "--out-dir", str(tmp / "run"),
                                         "--iters", "1", "--no-progress"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_weights_give_one_line_naming_the_file(command, name, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "image.png")
    path = tmp_path / name
    if BAD_FILES[name] is not None:
        path.write_bytes(BAD_FILES[name])
    assert cli.main(COMMANDS[command](str(path), tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gcnet: error: {path}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "pred").exists()


def test_convert_needs_no_variant_and_checks_one_given(tmp_path, capsys):
    assert cli.main(["convert", str(FIXTURE), "--out", str(tmp_path / "c8.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "GCNet (in_channels=3, channels=8, stage_blocks=(4, 4)" in out and "n_paths=2, 19 classes" in out
    assert ck.load(tmp_path / "c8.safetensors").config.channels == 8
    assert cli.main(["convert", str(FIXTURE), "--variant", "s", "--out", str(tmp_path / "s.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "holds another model than GCNet-S: channels 8 in the file, 32 asked" in err
    assert not (tmp_path / "s.safetensors").exists()


def _exit(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("sizes", ["512,1024", "512x1024x3", "0x64", "512x", "big"])
def test_bench_sizes_are_heightxwidth_or_one_clear_error(sizes, capsys):
    assert _exit(["bench", "--sizes", sizes]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcnet: error: argument --sizes: expected sizes as HEIGHTxWIDTH") and err.count("\n") == 1
    assert bench._sizes("512x1024,64X128") == [(512, 1024), (64, 128)]


@pytest.mark.parametrize("argv, message", [
    (["info", "--variant", "xl"], "argument --variant: invalid choice: 'xl'"),
    (["train", "--config", "/no/such/recipe.toml"], "missing config file: /no/such/recipe.toml"),
    (["eval", "/no/such/file.pt"], "/no/such/file.pt: no such file"),
])
def test_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    assert _exit(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcnet: error: ") and message in err and err.count("\n") == 1, err


def test_debug_shows_the_traceback():
    with pytest.raises(ck.CheckpointError, match="no such file"):
        cli.main(["eval", "/no/such/file.pt", "--debug"])


def test_version(capsys):
    assert _exit(["--version"]) == 0
    from reparam import __version__
    assert capsys.readouterr().out.strip() == f"gcnet (reparam {__version__})"


@pytest.mark.parametrize("missing", ["PIL", "PIL.Image", "matplotlib", "onnx", "onnxscript", "onnxruntime"])
def test_help_works_without_the_optional_packages(missing, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    for argv in (["--help"], ["predict", "--help"], ["export", "--help"], ["bench", "--help"]):
        assert _exit(argv) == 0
    assert "predict" in capsys.readouterr().out


@pytest.mark.parametrize("missing, argv, extra", [
    ("PIL", lambda tmp: ["predict", str(tmp / "a.png"), "--weights", str(tmp / "w.pt"), "--out", str(tmp)], "gcnet"),
    ("matplotlib", lambda tmp: ["bench", "--sizes", "32x32,64x64", "--out", str(tmp)], "gcnet"),
    ("onnxscript", lambda tmp: ["export", "--out", str(tmp / "m.onnx"), "--size", "64", "64"], "export"),
    ("onnxruntime", lambda tmp: ["export", "--out", str(tmp / "m.onnx"), "--size", "64", "64"], "export"),
])
def test_a_missing_extra_is_one_line_naming_it(missing, argv, extra, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, missing, None)
    assert cli.main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcnet: error: ") and err.count("\n") == 1
    assert err.rstrip().endswith(f"pip install 'reparam[{extra}]'"), err
    assert list(tmp_path.iterdir()) == []  # nothing done first


def test_bench_prints_its_threads_and_labels_the_spread(small_s, capsys):
    assert cli.main(["bench", "--sizes", "32x64", "--threads", "1", "--warmup", "0", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 CPU thread(s)" in out and "fp32 FPS (IQR)" in out


def test_plot_never_shows_negative_fps(tmp_path, monkeypatch):
    axes = []
    import matplotlib.axes
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, yerr=None, **kw: axes.append((self, y, yerr)) or real(self, x, y, yerr=yerr, **kw))
    timings = [bench.Timing("ours", "fused", "fp32", (32, 32), 2.0, -1.0, 3.0),
               bench.Timing("ours", "fused", "fp32", (64, 64), 1.0, 0.5, 1.5)]
    bench.plot(timings, tmp_path / "p.png")
    [(ax, y, (low, _))] = axes
    assert all(v - e >= 0 for v, e in zip(y, low)) and ax.get_ylim()[0] == 0


def test_overlay_leaves_background_and_ignored_pixels_as_they_are():
    from gcnet.predict import background_ids, overlay
    palette = np.array([(0, 0, 0), (255, 0, 0)], np.uint8)
    mask = np.array([[0, 1], [255, 1]], np.uint8)
    image = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(image, mask, palette, alpha=0.5, keep=background_ids(("background", "car")))
    assert out[0, 0].tolist() == out[1, 0].tolist() == [100, 100, 100]  # background, ignore: the image
    assert out[0, 1].tolist() == [178, 50, 50]
    assert background_ids(("road", "car")) == ()


def test_the_sample_image_is_small_and_readable():
    from gcnet.datasets import read_image
    path = Path(__file__).resolve().parents[1] / "docs" / "assets" / "sample.png"
    assert path.stat().st_size < 50_000 and read_image(path, "RGB").shape[2] == 3


@pytest.mark.parametrize("command", ["info", "bench", "train"])
def test_n_paths_help_says_which_n_reaches_which_miou(command, capsys):
    assert _exit([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "N=2: the release's config and weights, 76.9 mIoU" in text
    assert "N=3: its README's 77.3 (no config, no weights)" in text and "N=4: the paper's text" in text
