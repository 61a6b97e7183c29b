"""Deploy artifacts: `reparam.save` / `reparam.load` round trips (fused weights only, rebuilt on
the meta device), and GCNet's deploy files (`gcnet convert --deploy`, `gcnet eval --save-deploy`)
that `gcnet eval` / `predict` load as they are."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `examples`

import reparam  # noqa: E402
from examples.blocks import RepVGGBlock, randomize_norms  # noqa: E402
from gcnet import cli, gcnet_s  # noqa: E402
from gcnet import checkpoint as ck  # noqa: E402
from gcnet import evaluate as ev  # noqa: E402
from reparam.deploy import read_metadata  # noqa: E402

from test_gcnet_checkpoint import SMALL  # noqa: E402
from test_gcnet_datasets import make_layout  # noqa: E402


def blocks() -> nn.Module:
    return nn.Sequential(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8))


def test_round_trip_holds_the_fused_weights_only(tmp_path):
    model = randomize_norms(blocks(), seed=0).eval()
    fused = reparam.fuse(model)
    path = reparam.save(fused, tmp_path / "d.safetensors", build="test_deploy:blocks", metadata={"classes": 3})
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(fused.state_dict())  # no training-form tensor
    assert read_metadata(path)["metadata"] == {"classes": 3} and read_metadata(path)["build"] == "test_deploy:blocks"
    loaded = reparam.load(path, blocks)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
    assert reparam.count(loaded).params == reparam.count(fused).params < reparam.count(model).params


def test_load_builds_on_the_meta_device(tmp_path):
    path = reparam.save(reparam.fuse(blocks().eval()), tmp_path / "d.safetensors")
    devices = []

    def build():
        devices.append(torch.empty(1).device.type)
        return blocks()

    reparam.load(path, build)
    assert devices == ["meta"]


def test_another_structure_or_another_file_is_refused(tmp_path):
    path = reparam.save(reparam.fuse(blocks().eval()), tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="another structure"):
        reparam.load(path, lambda: nn.Sequential(RepVGGBlock(3, 4)))
    torch.save({}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a reparam deploy file"):
        reparam.load(tmp_path / "x.pt", blocks)


@pytest.fixture(scope="module")
def training_file(tmp_path_factory):
    """A narrow 3-class GCNet-S in our training-form file layout, random BN statistics."""
    torch.manual_seed(0)
    model = randomize_norms(gcnet_s(num_classes=3, **SMALL), seed=1).eval()
    path = tmp_path_factory.mktemp("deploy") / "train.safetensors"
    return ck._save_converted(model, "test", path), model


def test_convert_deploy_file_loads_as_is_and_agrees(training_file, tmp_path, capsys, monkeypatch):
    path, model = training_file
    out = tmp_path / "deploy.safetensors"
    assert cli.main(["convert", str(path), "--out", str(out), "--deploy"]) == 0
    assert "the deploy form (reparam.save" in capsys.readouterr().out
    monkeypatch.setattr(ev, "deploy", lambda *a, **k: pytest.fail("a deploy file is fused again"))
    loaded, info = ev.load_for_inference(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert reparam.testing.rel_error(model(x), loaded(x)) < 1e-5
    assert reparam.count(loaded).params == reparam.count(reparam.fuse(model)).params
    assert len(info["classes"]) == 3 and info["palette"].shape == (3, 3)
    assert cli.main(["eval", str(out), "--variant", "m"]) == 2
    assert "holds another model than GCNet-M" in capsys.readouterr().err


def test_eval_save_deploy_then_predict_from_it(training_file, tmp_path, capsys):
    path, model = training_file
    out = tmp_path / "deploy.safetensors"
    root = make_layout("folder", tmp_path / "data", n=1)
    args = ["eval", str(path), "--dataset", "folder", "--data-root", str(root), "--num-classes", "3", "--split", "val",
            "--workers", "0", "--save-deploy", str(out)]
    assert cli.main(args + ["--deploy"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "deploy (reparam.fuse)" in printed
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err  # never replaced silently
    image = tmp_path / "street.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    assert cli.main(["predict", str(image), "--weights", str(out), "--out", str(tmp_path / "pred")]) == 0
    assert Image.open(tmp_path / "pred" / "street_mask.png").size == (60, 40)
