"""The release's training recipe, item by item (GCNET.md "Training recipe"): each test computes
its expectation on its own (numpy, explicit sorting and counting), not with gcnet's code."""
import colorsys

import numpy as np
import pytest
import torch
from torch import nn

from gcnet import gcnet_s
from gcnet.losses import GCNetLoss, OhemCrossEntropy
from gcnet.presets import PRESETS, make_config
from gcnet.transforms import MEAN, STD, hsv_to_rgb, photometric_distortion, random_crop, rgb_to_hsv, train_transform
from gcnet.train import criterion_for, with_sync_bn

RELEASE_CITYSCAPES_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
                              0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]


def ohem_by_hand(logits, labels, min_kept, thresh=0.9, weight=None):
    """The release's OhemCrossEntropy in numpy: softmax, sort the valid pixels' true-class
    probabilities over the whole batch, threshold = max(sorted[min(min_kept, n - 1)], thresh),
    mean of the (class-weighted) losses of the pixels below it."""
    x = logits.double().numpy()
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = labels.numpy()
    valid = y != 255
    n_idx, h_idx, w_idx = np.nonzero(valid)
    prob = p[n_idx, y[valid], h_idx, w_idx]
    loss = -np.log(prob) * (1.0 if weight is None else np.asarray(weight)[y[valid]])
    threshold = max(np.sort(prob)[min(min_kept, prob.size - 1)], thresh)
    return loss[prob < threshold].mean()


def fixed_batch(classes=4, seed=0):
    """3 images of 8×8: most pixels confidently right (p > 0.9), some hard, a few ignored."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (3, 8, 8), generator=g)
    labels[0, 0, :5] = 255
    logits = torch.randn(3, classes, 8, 8, generator=g)
    easy = torch.rand(3, 8, 8, generator=g) < 0.75
    logits += 6.0 * easy[:, None] * nn.functional.one_hot(labels.clamp(max=classes - 1), classes).permute(0, 3, 1, 2)
    return logits, labels


def test_ohem_min_kept_counts_per_loss_call_not_per_image():
    logits, labels = fixed_batch()
    expected = ohem_by_hand(logits, labels, min_kept=60)
    assert OhemCrossEntropy(min_kept=60)(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    per_image = ohem_by_hand(logits, labels, min_kept=3 * 60)  # the old reading, mmseg's sampler's
    assert abs(per_image - expected) > 0.1 * expected  # the batch is such that the two differ


def test_class_weights_scale_both_losses():
    logits, labels = fixed_batch()
    aux, _ = fixed_batch(seed=1)
    weight = [0.5, 1.0, 2.0, 4.0]
    total, main, aux_loss = GCNetLoss(min_kept=60, class_weight=weight)((logits, aux), labels)
    assert main.item() == pytest.approx(ohem_by_hand(logits, labels, 60, weight=weight), rel=1e-6)
    assert aux_loss.item() == pytest.approx(ohem_by_hand(aux, labels, 60, weight=weight), rel=1e-6)
    assert total.item() == pytest.approx(main.item() + 0.4 * aux_loss.item(), rel=1e-6)


def test_cityscapes_recipe_passes_the_release_class_weights_to_both_losses():
    config = PRESETS["cityscapes"]
    assert list(config.class_weight) == RELEASE_CITYSCAPES_WEIGHTS and config.min_kept == 131072
    criterion = criterion_for(config)
    assert criterion.ohem.class_weight.tolist() == pytest.approx(RELEASE_CITYSCAPES_WEIGHTS)
    assert (criterion.main_weight, criterion.aux_weight) == (1.0, 0.4)
    assert all(PRESETS[name].class_weight is None for name in ("camvid", "voc"))


def good_windows(label, size, ratio):
    """Fraction of all crop positions whose window passes mmseg's cat_max_ratio test, by brute force."""
    (h, w), (ch, cw) = label.shape, size
    good = 0
    for top in range(h - ch + 1):
        for left in range(w - cw + 1):
            counts = np.bincount(label[top:top + ch, left:left + cw].ravel())
            counts = counts[counts > 0]
            good += len(counts) > 1 and counts.max() / counts.sum() < ratio
    return good / ((h - ch + 1) * (w - cw + 1))


def test_random_crop_redraws_windows_one_class_dominates():
    label = np.zeros((50, 100), np.int64)
    label[:, 80:] = 1  # class 0 fills most windows
    p = good_windows(label, (50, 50), 0.75)  # 8 of 51 positions
    mixed = lambda ratio: np.mean([
        good_windows(random_crop(torch.zeros(3, 50, 100), torch.from_numpy(label), np.random.default_rng(s),
                                 (50, 50), ratio)[1].numpy(), (50, 50), 0.75) for s in range(300)])
    assert mixed(1.0) == pytest.approx(p, abs=0.06)  # no re-draw: any window
    assert mixed(0.75) == pytest.approx(1 - (1 - p) ** 11, abs=0.06)  # 10 re-draws after the first
    assert PRESETS["cityscapes"].cat_max_ratio == 0.75


def test_small_crops_are_padded_with_zero_after_normalization():
    image = np.full((40, 50, 3), 200, np.uint8)
    img, lbl = train_transform(image, np.ones((40, 50), np.uint8), np.random.default_rng(0), (64, 64),
                               ratio_range=(1.0, 1.0), photometric=False)
    assert img.shape == (3, 64, 64) and lbl.shape == (64, 64)
    assert (img[:, 40:] == 0).all() and (img[:, :, 50:] == 0).all()  # 0 in normalized space
    assert (lbl[40:] == 255).all() and (lbl[:, 50:] == 255).all() and (lbl[:40, :50] == 1).all()
    inside = torch.tensor([(200 - m) / s for m, s in zip(MEAN, STD)], dtype=torch.float32)
    assert torch.allclose(img[:, :40, :50], inside.view(3, 1, 1).expand(3, 40, 50))


def test_hsv_conversions_agree_with_colorsys():
    rgb = torch.rand(3, 7, 9, dtype=torch.float64)
    h, s, v = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (3, 4), (6, 8)]:
        assert (h[y, x].item(), s[y, x].item(), v[y, x].item()) == pytest.approx(colorsys.rgb_to_hsv(*rgb[:, y, x].tolist()))
    assert torch.allclose(hsv_to_rgb(h, s, v), rgb)


def photometric_by_hand(pixels, rng):
    """mmseg's PhotoMetricDistortion, its draws in its order, colours by colorsys; pixels (n, 3) 0..255."""
    coin = lambda: rng.integers(2) == 1
    px = np.asarray(pixels, np.float64)

    def in_hsv(change):
        return np.array([colorsys.hsv_to_rgb(*change(*colorsys.rgb_to_hsv(*p))) for p in px / 255]) * 255

    def contrast(px):
        return np.clip(px * rng.uniform(0.5, 1.5), 0, 255) if coin() else px

    if coin():
        px = np.clip(px + rng.uniform(-32, 32), 0, 255)
    contrast_first = coin()
    if contrast_first:
        px = contrast(px)
    if coin():
        factor = rng.uniform(0.5, 1.5)
        px = in_hsv(lambda h, s, v: (h, min(s * factor, 1.0), v))
    if coin():
        shift = rng.integers(-18, 18) / 180  # OpenCV's hue runs 0..180
        px = in_hsv(lambda h, s, v: ((h + shift) % 1, s, v))
    if not contrast_first:
        px = contrast(px)
    return px


def test_photometric_distortion_in_all_three_release_recipes():
    assert all(PRESETS[name].photometric for name in ("cityscapes", "camvid", "voc"))
    image = torch.rand(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 255
    pixels = image.reshape(3, -1).T.numpy()
    for seed in range(24):  # every branch: each step is taken with probability 1/2
        out = photometric_distortion(image, np.random.default_rng(seed))
        expected = photometric_by_hand(pixels, np.random.default_rng(seed))
        assert np.allclose(out.reshape(3, -1).T.numpy(), expected, atol=1e-9), seed
    raw = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    transform = lambda seed, photometric: train_transform(raw, np.zeros((32, 32), np.uint8), np.random.default_rng(seed),
                                                          (32, 32), photometric=photometric)[0]
    assert sum(not torch.equal(transform(seed, True), transform(seed, False)) for seed in range(16)) >= 12


def test_camvid_trains_on_train_only_and_tests_on_test_with_960_high_crops():
    config = PRESETS["camvid"]
    # the release's crop_size = (960, 720) is (H, W) in mmseg: 960 high, 720 wide (the paper: 720x960)
    assert (config.train_splits, config.val_split, config.crop_size) == (("train",), "test", (960, 720))
    image, label = np.zeros((720, 960, 3), np.uint8), np.arange(720 * 960).reshape(720, 960) % 11
    img, lbl = train_transform(image, label.astype(np.uint8), np.random.default_rng(0), config.crop_size,
                               (1.0, 1.0), photometric=False)
    assert img.shape == (3, 960, 720) and lbl.shape == (960, 720)
    assert (lbl[720:] == 255).all() and (lbl[:720] != 255).all()  # 720 rows of image, padded to 960


def test_sync_bn_on_several_gpus():
    model = gcnet_s(channels=8, ppm_channels=16, head_channels=16)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    synced = with_sync_bn(model, 2, torch.device("cuda"))  # conversion only: runs on a CPU
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == bns
    assert with_sync_bn(model, 1, torch.device("cuda")) is model
    assert with_sync_bn(model, 2, torch.device("cpu")) is model  # SyncBatchNorm runs on CUDA only


def test_bn_sync_per_dataset_as_the_release_configs():
    # the release's norm_cfg: plain BN for Cityscapes and CamVid, SyncBN for VOC only
    assert {name: PRESETS[name].sync_bn for name in ("cityscapes", "camvid", "voc")} == \
        {"cityscapes": False, "camvid": False, "voc": True}
    assert make_config("cityscapes", overrides={"sync_bn": True}).sync_bn  # --sync-bn opts in


@pytest.mark.parametrize("dataset", ["camvid", "voc"])
def test_camvid_and_voc_start_from_cityscapes_weights(dataset, tmp_path):
    from gcnet.errors import ConfigError
    from gcnet.train import train
    config = make_config(dataset, overrides={"data_root": str(tmp_path), "out_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="from Cityscapes weights: pass --init-from"):
        train(config)
    assert not (tmp_path / "run").exists()
