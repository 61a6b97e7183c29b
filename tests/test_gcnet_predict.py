"""gcnet predict: colour masks and overlays from a checkpoint or a deploy file (real GCNet-S)."""
import numpy as np
import pytest
import torch

import reparam.deploy
from PIL import Image

from gcnet import cli, gcnet_s
from gcnet.checkpoint import to_release
from gcnet.evaluate import load_for_inference
from gcnet.predict import mask_image, overlay, predict_files
from gcnet.presets import make_config
from gcnet.train import train

from test_gcnet_datasets import make_layout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(checkpoint after one step on a 3-class folder dataset, an image to segment)."""
    tmp = tmp_path_factory.mktemp("predict")
    root = make_layout("folder", tmp / "data", n=1)
    config = make_config("folder", overrides=dict(data_root=str(root), out_dir=str(tmp / "run"), iters=1,
                                                  batch_size=2, crop_size=(64, 64), workers=0, min_kept=512,
                                                  progress=False))
    image = tmp / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
    return train(config), image


def test_masks_carry_class_ids_and_the_palette(run, tmp_path):
    checkpoint, image = run
    model, info = load_for_inference(checkpoint)
    written = predict_files(model, info["palette"], [image], tmp_path)
    assert [p.name for p in written] == ["street_mask.png", "street_overlay.png"]
    mask = Image.open(written[0])
    assert mask.mode == "P" and mask.size == (70, 50)  # the input's size, not the network's
    assert set(np.unique(np.array(mask)).tolist()) <= {0, 1, 2}
    assert np.array_equal(np.array(mask.convert("RGB"))[0, 0], info["palette"][np.array(mask)[0, 0]])
    over = Image.open(written[1])
    assert over.mode == "RGB" and over.size == (70, 50)


def test_existing_outputs_are_kept_without_overwrite(run, tmp_path, capsys):
    checkpoint, image = run
    args = ["predict", str(image), "--weights", str(checkpoint), "--out", str(tmp_path)]
    assert cli.main(args) == 0
    (tmp_path / "street_overlay.png").write_bytes(b"mine")
    assert cli.main(args) == 2  # a user's mistake: one line, exit 2
    assert "street_mask.png exists" in capsys.readouterr().err
    assert (tmp_path / "street_overlay.png").read_bytes() == b"mine"
    assert cli.main(args + ["--overwrite"]) == 0
    assert Image.open(tmp_path / "street_overlay.png").size == (70, 50)


def test_deploy_file_predicts_what_the_checkpoint_predicts(run, tmp_path, capsys):
    """`gcnet eval --deploy --save-deploy` writes a deploy file; predict fuses it on load."""
    checkpoint, image = run
    deploy_file = tmp_path / "deploy.safetensors"
    assert cli.main(["eval", str(checkpoint), "--deploy", "--save-deploy", str(deploy_file), "--workers", "0"]) == 0
    assert "deploy (reparam.fuse)" in capsys.readouterr().out
    meta = reparam.deploy.read_metadata(deploy_file)  # the fused weights and what rebuilds them
    assert meta["build"] == "gcnet.GCNet(s)" and "classes" in meta["metadata"]
    assert cli.main(["eval", str(checkpoint), "--save-deploy", str(deploy_file)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    assert cli.main(["predict", str(image), "--weights", str(deploy_file), "--out", str(tmp_path / "d")]) == 0
    model, info = load_for_inference(checkpoint)  # training form, not fused
    predict_files(model, info["palette"], [image], tmp_path / "t")
    fused_mask = np.array(Image.open(tmp_path / "d" / "street_mask.png"))
    mask = np.array(Image.open(tmp_path / "t" / "street_mask.png"))
    assert (fused_mask != mask).mean() < 1e-3  # float rounding may flip a near-tie pixel, no more


def test_missing_images_and_clashing_names_fail_before_writing(run, tmp_path):
    checkpoint, image = run
    model, info = load_for_inference(checkpoint)
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        predict_files(model, info["palette"], [tmp_path / "nowhere.png"], tmp_path / "out")
    twin = tmp_path / "twin" / image.name
    twin.parent.mkdir()
    twin.write_bytes(image.read_bytes())
    with pytest.raises(ValueError, match="share a file stem"):
        predict_files(model, info["palette"], [image, twin], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_release_weights_get_the_benchmark_palette(tmp_path):
    """The release's files record no classes: 19 outputs read as Cityscapes."""
    model = gcnet_s()
    torch.save({"state_dict": to_release(model.state_dict(), model.config)}, tmp_path / "release.pth")
    _, info = load_for_inference(tmp_path / "release.pth", variant="s")
    assert info["classes"][0] == "road" and info["palette"][13].tolist() == [0, 0, 142]


def test_mask_image_and_overlay():
    palette = np.array([(0, 0, 0), (255, 0, 0)], np.uint8)
    mask = np.array([[0, 1], [255, 1]], np.uint8)
    img = mask_image(mask, palette)
    assert np.array_equal(np.array(img), mask)  # ids survive, 255 stays 255
    assert np.array(img.convert("RGB"))[0, 1].tolist() == [255, 0, 0]
    assert np.array(img.convert("RGB"))[1, 0].tolist() == [0, 0, 0]  # ignore shows black
    image = np.full((2, 2, 3), 100, np.uint8)
    assert overlay(image, mask, palette, alpha=0.5)[0, 1].tolist() == [178, 50, 50]
