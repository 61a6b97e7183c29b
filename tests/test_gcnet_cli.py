"""The `gcnet` command line: subcommand discovery, info, bench, convert."""
import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from gcnet import GCNET_S, cli, gcnet_s
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
    assert "release/training" in out and "fused/release" in out
    with open(tmp_path / "gcnet_s_cpu_float32.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["form"], r["height"]) for r in rows] == [
        (form, h) for h in ("32", "64") for form in ("training", "release", "fused")]
    assert all(float(r["fps"]) > 0 for r in rows)
    assert (tmp_path / "gcnet_s_cpu_float32.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_half_precision_channels_last(small_s, capsys):
    assert cli.main(["bench", "--sizes", "32x64", "--dtype", "bfloat16", "--channels-last",
                     "--warmup", "0", "--repeats", "1"]) == 0
    assert "bfloat16, channels-last" in capsys.readouterr().out


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
    assert cli.main(COMMANDS[command](str(path), tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gcnet: error: {path}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "pred").exists()


def test_convert_needs_no_variant_and_checks_one_given(tmp_path, capsys):
    assert cli.main(["convert", str(FIXTURE), "--out", str(tmp_path / "c8.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "GCNet (in_channels=3, channels=8, stage_blocks=(4, 4)" in out and "n_paths=2, 19 classes" in out
    assert ck.load(tmp_path / "c8.safetensors").config.channels == 8
    assert cli.main(["convert", str(FIXTURE), "--variant", "s", "--out", str(tmp_path / "s.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "holds another model than GCNet-S: channels 8 in the file, 32 asked" in err
    assert not (tmp_path / "s.safetensors").exists()
