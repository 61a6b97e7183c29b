"""gcnet datasets and transforms on tiny generated copies of each layout (no model involved).

`make_layout` writes a few small random images in a dataset's on-disk layout; the training,
evaluation and prediction tests import it."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gcnet.datasets import (CAMVID_CLASSES, CITYSCAPES_LABELS, DEMO_CLASSES, Demo, build_dataset,
                            colors_to_ids, voc_palette)
from gcnet.transforms import eval_transform, keep_ratio_size, train_transform

SPLITS = {"cityscapes": ("train", "val"), "camvid": ("train", "val", "test"), "voc": ("train", "val"),
          "folder": ("train", "val")}
NUM_CLASSES = {"cityscapes": 19, "camvid": 11, "voc": 21, "folder": 3}


def _save(array: np.ndarray, path: Path, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img = Image.frombytes("P", img.size, array.tobytes())
        img.putpalette(palette.flatten().tolist())
    img.save(path)


def make_layout(name: str, root: Path, n: int = 2, size=(64, 96), seed: int = 0) -> Path:
    """`n` random images per split of dataset `name` under `root`, labels in its raw encoding."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split in SPLITS[name]:
        for i in range(n):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            stem = f"{split}{i}"
            if name == "cityscapes":
                city = f"city{i % 2}"
                _save(image, root / "leftImg8bit" / split / city / f"{city}_{stem}_leftImg8bit.png")
                _save(rng.integers(0, 34, (h, w), dtype=np.uint8),
                      root / "gtFine" / split / city / f"{city}_{stem}_gtFine_labelIds.png")
            elif name == "camvid":
                colors = np.array([c for _, c in CAMVID_CLASSES] + [(64, 128, 64)], np.uint8)  # + Animal
                _save(image, root / split / f"{stem}.png")
                _save(colors[rng.integers(0, len(colors), (h, w))], root / f"{split}_labels" / f"{stem}_L.png")
            elif name == "voc":
                _save(image, root / "JPEGImages" / f"{stem}.jpg")
                label = rng.integers(0, 21, (h, w), dtype=np.uint8)
                label[:2] = 255  # object border
                _save(label, root / "SegmentationClass" / f"{stem}.png", voc_palette())
            else:
                _save(image, root / split / "images" / f"{stem}.png")
                _save(rng.integers(0, 3, (h, w), dtype=np.uint8), root / split / "masks" / f"{stem}.png")
        if name == "voc":
            listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("".join(f"{split}{i}\n" for i in range(n)))
    if name == "folder":
        (root / "classes.txt").write_text("sky\nground\nthing\n")
    return root


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_each_layout_reads_as_class_ids(name, tmp_path):
    root = make_layout(name, tmp_path, size=(48, 80))
    for split in SPLITS[name]:
        ds = build_dataset(name, root, split)
        assert len(ds) == 2 and len(ds.classes) == NUM_CLASSES[name] == len(ds.palette)
        image, label = ds[1]
        assert image.shape == (48, 80, 3) and image.dtype == np.uint8
        assert label.shape == (48, 80) and label.dtype == np.uint8
        ids = set(np.unique(label).tolist())
        assert ids <= set(range(NUM_CLASSES[name])) | {255}
    assert len(build_dataset(name, root, SPLITS[name])) == 2 * len(SPLITS[name])  # splits concatenated


def test_cityscapes_uses_the_official_train_ids(tmp_path):
    root = make_layout("cityscapes", tmp_path)
    ds = build_dataset("cityscapes", root, "train")
    raw = np.array(Image.open(ds.pairs[0][1]))
    _, label = ds[0]
    train_id = {id_: t for _, id_, t, _ in CITYSCAPES_LABELS}
    assert all((label[raw == i] == train_id[i]).all() for i in range(34))
    assert train_id[7] == 0 and train_id[26] == 13 and train_id[33] == 18 and train_id[9] == 255
    assert ds.classes[0] == "road" and ds.classes[18] == "bicycle"
    assert tuple(ds.palette[13]) == (0, 0, 142)


def test_camvid_colours_map_to_classes_and_unknown_colours_are_ignored():
    palette = np.array([c for _, c in CAMVID_CLASSES], np.uint8)
    rgb = np.array([[palette[6], palette[9], (64, 128, 64), (0, 0, 0)]], np.uint8)  # road, sky, Animal, void
    assert colors_to_ids(rgb, palette).tolist() == [[6, 9, 255, 255]]


def test_voc_keeps_the_border_ignored(tmp_path):
    _, label = build_dataset("voc", make_layout("voc", tmp_path), "val")[0]
    assert (label[:2] == 255).all() and label[2:].max() <= 20


def test_folder_without_class_names_needs_a_count(tmp_path):
    root = make_layout("folder", tmp_path)
    (root / "classes.txt").unlink()
    with pytest.raises(ValueError, match="number of classes"):
        build_dataset("folder", root, "train")
    assert len(build_dataset("folder", root, "train", num_classes=3).classes) == 3
    with pytest.raises(ValueError, match="class id 2 but the dataset has 2 classes"):
        build_dataset("folder", root, "train", num_classes=2)[0]
    mask = root / "train" / "masks" / "train0.png"
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(mask)  # a colour mask
    with pytest.raises(ValueError, match="train0.png has 3 channels"):
        build_dataset("folder", root, "train", num_classes=3)[0]


def test_missing_and_corrupt_files_name_their_path(tmp_path):
    root = make_layout("cityscapes", tmp_path)
    label = next((root / "gtFine" / "val").rglob("*_labelIds.png"))
    label.unlink()
    with pytest.raises(FileNotFoundError, match=str(label)):
        build_dataset("cityscapes", root, "val")
    image = next((root / "leftImg8bit" / "train").rglob("*.png"))
    image.write_bytes(image.read_bytes()[:100])  # truncated
    ds = build_dataset("cityscapes", root, "train")
    with pytest.raises(OSError, match=str(image)):
        ds[[p for p, _ in ds.pairs].index(image)]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("camvid", tmp_path / "nowhere", "train")
    voc = make_layout("voc", tmp_path / "voc")
    (voc / "JPEGImages" / "val1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="val1.jpg"):
        build_dataset("voc", voc, "val")


def test_demo_is_reproducible_and_shows_every_class():
    ds = Demo(split="val", size=64)
    a, b = ds[3], ds[3]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(ds[3][0], ds[4][0])
    assert not np.array_equal(Demo(split="train", size=64)[3][0], a[0])
    seen = set().union(*(np.unique(ds[i][1]).tolist() for i in range(len(ds))))
    assert seen == set(range(len(DEMO_CLASSES)))


def test_train_transform_crops_pads_and_repeats_with_the_seed():
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    label = np.ones((40, 50), np.uint8)
    # rescaled by 0.5-0.6, always smaller than the crop: padded
    img, lbl = train_transform(image, label, np.random.default_rng(1), (64, 64), (0.5, 0.6))
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and lbl.shape == (64, 64)
    assert (lbl == 255).any() and (lbl == 1).any()  # padding is ignored, the image keeps its class
    again = train_transform(image, label, np.random.default_rng(1), (64, 64), (0.5, 0.6))
    assert torch.equal(img, again[0]) and torch.equal(lbl, again[1])


def test_eval_resizes_the_image_and_keeps_the_label_size():
    assert keep_ratio_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert keep_ratio_size(375, 500, (2048, 512)) == (512, 683)  # VOC: short side to 512
    image = np.zeros((375, 500, 3), np.uint8)
    img, lbl = eval_transform(image, np.zeros((375, 500), np.uint8), eval_size=(2048, 512))
    assert img.shape == (3, 512, 683) and lbl.shape == (375, 500)
    assert torch.allclose(img[:, 0, 0], -torch.tensor([123.675 / 58.395, 116.28 / 57.12, 103.53 / 57.375]))


def test_camvid_reads_single_channel_ids_and_rgb_colours_and_refuses_anything_else(tmp_path):
    root = make_layout("camvid", tmp_path, n=1, size=(4, 6))
    label_file = root / "train_labels" / "train0_L.png"
    ids = np.array([[0, 6, 10, 255, 9, 1]] * 4, np.uint8)
    palette = np.array([c for _, c in CAMVID_CLASSES], np.uint8)
    void_and_animal = np.array([[0, 0, 0], [64, 128, 64]], np.uint8)  # CamVid colours of no training class
    for name, saved in [("single-channel ids (as the release reads them)", ids),
                        ("RGB colours", np.where(ids[..., None] == 255, void_and_animal[0], palette[ids.clip(max=10)]))]:
        _save(saved, label_file)
        assert build_dataset("camvid", root, "train")[0][1].tolist() == ids.tolist(), name
    _save(ids, label_file, palette=np.zeros((256, 3), np.uint8))  # a palette PNG: its indices are the ids
    assert build_dataset("camvid", root, "train")[0][1].tolist() == ids.tolist()
    for bad in (np.where(ids == 6, 11, ids).astype(np.uint8),  # id 11: not a CamVid class (SegNet's void)
                np.full((4, 6, 3), (1, 2, 3), np.uint8)):       # a colour CamVid does not use
        _save(bad, label_file)
        with pytest.raises(ValueError, match=f"^{label_file}: ") as error:
            build_dataset("camvid", root, "train")[0]
        assert "\n" not in str(error.value)
