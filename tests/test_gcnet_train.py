"""gcnet train / eval on tiny generated datasets with the real GCNet-S; OHEM loss; exact resume."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gcnet import cli, gcnet_s
from gcnet.errors import ConfigError
from gcnet.evaluate import EvalResult, confusion_matrix, evaluate, load_for_inference
from gcnet.losses import GCNetLoss, OhemCrossEntropy
from gcnet.presets import PRESETS, dataset_for, make_config
from gcnet.train import TrainSamples, load_matching, read_checkpoint, train

from test_gcnet_datasets import SPLITS, make_layout

# 64×64 crops of 64×96 images, batch 2, one or a few steps: wiring, not accuracy, is under test.
TINY = dict(iters=1, batch_size=2, crop_size=(64, 64), base_size=None, eval_size=None, workers=0,
            min_kept=1024, progress=False, init_required=False)


def tiny_config(name, root, out, **overrides):
    return make_config(name, overrides={**TINY, "data_root": str(root), "out_dir": str(out), **overrides})


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_train_step_eval_and_predict_on_each_layout(name, tmp_path, capsys):
    root = make_layout(name, tmp_path / "data", n=1, size=(64, 64))
    config = tiny_config(name, root, tmp_path / "run")
    last = train(config)
    state = read_checkpoint(last)
    val = dataset_for(config, SPLITS[name][-1])
    assert state["iteration"] == 1 and tuple(json.loads(state["meta"]["classes"])) == val.classes
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["loss"]) > 0 and 0 <= float(rows[-1]["val_miou"]) <= 1

    assert cli.main(["eval", str(last), "--workers", "0", "--split", SPLITS[name][-1]]) == 0
    out = capsys.readouterr().out
    assert "mean" in out and f"{name} {SPLITS[name][-1]} (1 images)" in out

    image = val.pairs[0][0]
    assert cli.main(["predict", str(image), "--weights", str(last), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / f"{image.stem}_mask.png").is_file()


def test_resume_is_exact(tmp_path):
    """4 iterations in one run == 2, pause, resume, 2 more: every weight, buffer and momentum."""
    root = make_layout("folder", tmp_path / "data", n=1)
    common = dict(iters=4, val_every=2, deterministic=True)
    whole = read_checkpoint(train(tiny_config("folder", root, tmp_path / "whole", **common)))
    paused = train(tiny_config("folder", root, tmp_path / "parts", stop_at=2, **common))
    assert read_checkpoint(paused)["iteration"] == 2
    parts = read_checkpoint(train(tiny_config("folder", root, tmp_path / "parts", **common), resume=paused))
    assert parts["iteration"] == whole["iteration"] == 4
    for key, value in whole["model"].items():
        assert torch.equal(value, parts["model"][key]), key
    momenta = lambda s: [v["momentum_buffer"] for v in s["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momenta(whole), momenta(parts)))
    assert whole["scheduler"]["last_epoch"] == parts["scheduler"]["last_epoch"] == 4


def test_cli_train_pause_and_resume_with_amp(tmp_path, capsys):
    root = make_layout("folder", tmp_path / "data", n=1)
    run = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-root", str(root), "--out-dir", str(run), "--iters", "2",
            "--batch-size", "2", "--crop-size", "64", "64", "--workers", "0", "--min-kept", "512", "--no-progress",
            "--amp"]  # bfloat16 autocast on the CPU
    assert cli.main(args + ["--stop-at", "1"]) == 0
    assert read_checkpoint(run / "last.pt")["iteration"] == 1
    assert cli.main(args) == 2  # a run is there: never start over silently
    assert "last.pt exists: pass --resume" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run / "last.pt")]) == 0  # the saved config carries on
    assert read_checkpoint(run / "last.pt")["iteration"] == 2
    with open(run / "log.csv") as f:
        assert [row["iteration"] for row in csv.DictReader(f) if row["loss"]] == ["1", "2"]
    weights = read_checkpoint(run / "last.pt")["model"].values()
    assert all(torch.isfinite(v).all() for v in weights if v.is_floating_point())


def test_config_file_and_flags_override_the_preset(tmp_path):
    file = tmp_path / "recipe.toml"
    file.write_text('lr = 0.02\niters = 10\ncrop_size = [32, 48]\n')
    config = make_config("cityscapes", file, {"iters": 20})
    assert (config.lr, config.iters, config.crop_size) == (0.02, 20, (32, 48))
    assert config.min_kept == 131072 and config.aux_weight == 0.4  # the recipe's
    with pytest.raises(ConfigError, match="unknown config key 'lr_rate'"):
        make_config("voc", overrides={"lr_rate": 1})


def test_processes_share_the_sample_stream():
    """Two processes with batch 2 see together what one process with batch 4 sees."""
    config = PRESETS["demo"]
    one = TrainSamples(range(10), config, batch=4)
    ranks = [TrainSamples(range(10), config, batch=2, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        together = [ranks[r].global_index(step * 2 + j) for r in range(2) for j in range(2)]
        assert together == [one.global_index(step * 4 + j) for j in range(4)]


def test_init_from_keeps_what_fits(tmp_path):
    source = gcnet_s(num_classes=3)
    target = gcnet_s(num_classes=11)
    skipped = load_matching(target, source.state_dict())
    assert skipped == ["aux_head.cls.bias", "aux_head.cls.weight", "head.cls.bias", "head.cls.weight"]
    assert torch.equal(target.stem[0].conv.weight, source.stem[0].conv.weight)


def test_deploy_scores_the_same_miou(tmp_path):
    root = make_layout("folder", tmp_path / "data", n=1)
    last = train(tiny_config("folder", root, tmp_path / "run", iters=2))
    val = dataset_for(tiny_config("folder", root, tmp_path), "val")
    model, _ = load_for_inference(last)
    fused, _ = load_for_inference(last, deploy_form=True)
    assert isinstance(fused, torch.fx.GraphModule)
    a, b = evaluate(model, val), evaluate(fused, val)
    assert a.miou == b.miou and torch.equal(a.confusion, b.confusion)


# --- losses and metrics ---------------------------------------------------------------------

def test_ohem_keeps_only_hard_pixels():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 0, :2] = torch.arange(4.0, 12.0).view(2, 4)  # top half: right with p > 0.9: easy
    pixel = F.cross_entropy(logits, labels, reduction="none").flatten()
    assert torch.isclose(OhemCrossEntropy(min_kept=1)(logits, labels), pixel[8:].mean())  # the hard half
    # min_kept above the number of hard pixels: the 12 hardest count
    assert torch.isclose(OhemCrossEntropy(min_kept=12)(logits, labels), pixel.sort(descending=True).values[:12].mean())


def test_ohem_upsamples_the_logits_to_the_labels():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    logits = torch.full((2, 3, 4, 4), -3.0)
    logits[:, 0] = 3.0  # every pixel easy (p > 0.9) ...
    logits[:, 0, 0, 0] = 2.5  # ... some less so
    loss = OhemCrossEntropy(min_kept=8)(logits, labels)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(up, labels, reduction="none").flatten().sort(descending=True).values
    assert torch.isclose(loss, per_pixel[:8].mean())  # the 8 hardest of the whole batch


def test_ohem_with_every_pixel_ignored_is_zero_with_a_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = OhemCrossEntropy()(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


def test_gcnet_loss_weights_the_auxiliary_head():
    labels = torch.randint(0, 3, (1, 8, 8))
    main, aux = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    total, m, a = GCNetLoss()((main, aux), labels)
    assert torch.isclose(total, m + 0.4 * a)


def test_miou_ignores_absent_classes_and_the_ignore_label():
    label = torch.tensor([0, 0, 1, 1, 255])
    pred = torch.tensor([0, 1, 1, 1, 2])
    result = EvalResult(confusion_matrix(pred, label, 3), ("a", "b", "c"))
    assert result.iou[:2].tolist() == [0.5, 2 / 3] and np.isnan(result.iou[2].item())
    assert result.miou == pytest.approx((0.5 + 2 / 3) / 2) and result.accuracy == 0.75
    assert "n/a" in result.table()


# --- a run that cannot be misconfigured silently ------------------------------------------

QUICK = ["train", "--iters", "2", "--batch-size", "2", "--crop-size", "64", "64", "--workers", "0", "--no-progress"]


@pytest.mark.parametrize("flag, message", [
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--ckpt-every", "0"], "--ckpt-every must be at least 1, got 0"),
    (["--ratio-range", "2", "0.5"], "--ratio-range must be LOW HIGH with 0 < LOW <= HIGH, got 2.0 0.5"),
    (["--crop-size", "0", "0"], "--crop-size must be two sizes of at least 1 (H W), got 0 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--iters", "-5"], "--iters must be at least 1, got -5"),
    (["--val-every", "-1"], "--val-every must be 0 (validate at the end only) or more, got -1"),
])
def test_each_bad_flag_is_one_clear_error_before_any_work(flag, message, tmp_path, capsys):
    assert cli.main(QUICK + ["--out-dir", str(tmp_path / "run")] + flag) == 2
    assert capsys.readouterr().err == f"gcnet: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_print_config_shows_each_value_and_where_it_came_from(tmp_path, capsys):
    file = tmp_path / "recipe.toml"
    file.write_text("iters = 10\nlr = 0.5\n")
    assert cli.main(["train", "--dataset", "cityscapes", "--config", str(file), "--lr", "0.02",
                     "--out-dir", str(tmp_path / "run"), "--print-config"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["lr"].split()[1:] == ["0.02", "flag", "--lr"]
    assert lines["iters"].split()[1:] == ["10", "config", "file", str(file)]
    assert lines["min_kept"].split()[1:] == ["131072", "preset", "cityscapes"]
    assert lines["class_weight"].split()[1] == "0.8373" and lines["class_weight"].endswith("preset cityscapes")
    assert not (tmp_path / "run").exists()


def test_a_nan_loss_stops_the_run_with_a_clear_message(tmp_path, monkeypatch, capsys):
    import gcnet.train as gt
    real = gt.criterion_for

    class Poisoned(torch.nn.Module):  # the second step's loss is NaN
        def __init__(self, config):
            super().__init__()
            self.criterion, self.calls = real(config), 0

        def forward(self, outputs, labels):
            self.calls += 1
            loss, main, aux = self.criterion(outputs, labels)
            return (loss * float("nan") if self.calls == 2 else loss), main, aux

    monkeypatch.setattr(gt, "criterion_for", Poisoned)
    root = make_layout("folder", tmp_path / "data", n=1)
    args = QUICK + ["--dataset", "folder", "--data-root", str(root), "--out-dir", str(tmp_path / "run"),
                    "--iters", "3", "--ckpt-every", "1", "--min-kept", "1024"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("gcnet: error: the loss is nan at iteration 2") and err.count("\n") == 1
    assert f"last good checkpoint: {tmp_path / 'run' / 'last.pt'}" in err
    assert read_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 1


def test_a_killed_checkpoint_write_leaves_no_temp_file_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # a process that dies between writing the temp file and renaming it, as a kill would leave it
    subprocess.run([sys.executable, "-c", "import os, sys, torch; from gcnet.train import save_atomic; "
                    "os.replace = lambda *a: os._exit(9); save_atomic({'x': torch.ones(1000)}, "
                    f"__import__('pathlib').Path({str(run / 'last.pt')!r}))"], check=False, cwd=Path(__file__).parents[1])
    stale = list(run.glob(".last.pt.*.tmp*"))
    assert len(stale) == 1 and not (run / "last.pt").exists()
    alive = run / f".best.pt.{os.getppid()}.tmp.pt"  # a write still going on in a live process
    alive.write_bytes(b"partial")
    root = make_layout("folder", tmp_path / "data", n=1)
    train(tiny_config("folder", root, run))
    assert not stale[0].exists() and alive.exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [alive.name]


def test_resume_does_not_log_replayed_iterations_twice(tmp_path):
    root = make_layout("folder", tmp_path / "data", n=1)
    config = lambda **o: tiny_config("folder", root, tmp_path / "run", iters=3, log_every=1, **o)
    train(config(stop_at=2))
    earlier = tmp_path / "at2.pt"
    earlier.write_bytes((tmp_path / "run" / "last.pt").read_bytes())
    train(config(), resume=tmp_path / "run" / "last.pt")  # iteration 3 logged, then "killed" ...
    train(config(), resume=earlier)  # ... and resumed from the checkpoint at 2: iteration 3 again
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["iteration"] for r in rows if r["loss"]] == ["1", "2", "3"]
    assert [r["iteration"] for r in rows if r["val_miou"]] == ["3"]
