"""Training augmentation and evaluation preprocessing, as functions of (image, label).

Inputs are a dataset's raw sample: image (H, W, 3) uint8 RGB, label (H, W) uint8 (255 = ignore).
Outputs are tensors: image (3, h, w) float32 normalized, label (h, w) int64.
Randomness comes from an explicit `numpy.random.Generator`, so a sample's augmentation is a
function of the generator's seed alone; training seeds it per sample, which makes runs and
resumed runs repeat exactly whatever the number of data-loading workers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import IGNORE_INDEX

# GCNET.md: ImageNet statistics on the 0..255 scale, RGB.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def to_tensors(image: np.ndarray, label: np.ndarray | None = None):
    """uint8 (H, W, 3) → float (3, H, W) on the 0..255 scale; label → int64 (H, W)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return img, None if label is None else torch.from_numpy(np.ascontiguousarray(label)).long()


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) on the 0..255 scale → zero mean, unit variance per channel."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (image - mean) / std


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an image rescaled to fit `scale` = (long side, short side) keeping its aspect
    ratio, as mmseg's `Resize(keep_ratio=True)`: (1024, 2048) with scale (2048, 1024) stays."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    """Image (3, H, W) bilinear, label (H, W) nearest, to `size` = (h, w)."""
    if tuple(image.shape[1:]) == tuple(size):
        return image, label
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def random_rescale(image, label, rng: np.random.Generator, ratio_range=(0.5, 2.0), base=None):
    """Rescale by a factor drawn uniformly from `ratio_range`, of `base` = (long, short) fitted
    keeping the aspect ratio (mmseg's RandomResize), or of the image's own size when None."""
    ratio = rng.uniform(*ratio_range)
    h, w = image.shape[1:]
    if base is not None:
        h, w = keep_ratio_size(h, w, base)
    return resize(image, label, (max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))))


def random_crop(image, label, rng: np.random.Generator, size: tuple[int, int], cat_max_ratio: float = 1.0,
                tries: int = 10):
    """mmseg's RandomCrop: a window of `size` = (h, w) at a random place (clipped to a smaller
    image: `pad` brings it to `size` after normalization). With cat_max_ratio < 1 the window is
    drawn again, up to `tries` times, while fewer than two classes are in it or one class
    covers at least `cat_max_ratio` of its labelled pixels; the last draw is kept as it is."""
    ch, cw = size
    h, w = label.shape

    def draw():
        top, left = int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))
        return slice(top, top + ch), slice(left, left + cw)

    rows, cols = draw()
    for _ in range(tries if cat_max_ratio < 1 else 0):
        window = label[rows, cols]
        _, counts = window[window != IGNORE_INDEX].unique(return_counts=True)
        if len(counts) > 1 and counts.max() < cat_max_ratio * counts.sum():
            break
        rows, cols = draw()
    return image[:, rows, cols], label[rows, cols]


def pad(image, label, size: tuple[int, int]):
    """Pad at the bottom and right to `size` = (h, w), as mmseg's data preprocessor after
    normalization: the image with 0 (the mean colour), the label with 255 (ignored)."""
    pad_h, pad_w = max(size[0] - image.shape[1], 0), max(size[1] - image.shape[2], 0)
    if not (pad_h or pad_w):
        return image, label
    return (F.pad(image, (0, pad_w, 0, pad_h), value=0.0),
            F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX))


def random_flip(image, label, rng: np.random.Generator, p: float = 0.5):
    if rng.random() < p:
        return image.flip(-1), label.flip(-1)
    return image, label


def rgb_to_hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, H, W) RGB in [0, 1] → hue in [0, 1) (a turn), saturation, value, each (H, W)."""
    value, low = rgb.max(0).values, rgb.min(0).values
    delta = value - low
    d = delta.clamp(min=1e-12)
    r, g, b = rgb
    hue = torch.where(value == r, (g - b) / d, torch.where(value == g, 2 + (b - r) / d, 4 + (r - g) / d))
    hue = torch.where(delta > 0, (hue / 6) % 1, 0.0)
    return hue, torch.where(value > 0, delta / value.clamp(min=1e-12), 0.0), value


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_hsv`: (H, W) each → (3, H, W) RGB in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + hue * 6) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator, brightness: float = 32,
                           contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue: int = 18) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on (3, H, W) RGB on the 0..255 scale, its draws in its order:
    each step with probability 1/2, a brightness shift in ±32, a contrast factor in 0.5-1.5 (first
    or last, at random), a saturation factor in 0.5-1.5, a hue shift in [-18, 18) of OpenCV's
    0..180 hue scale; values clipped to 0..255 after each step (mmseg also rounds them to uint8)."""
    coin = lambda: rng.integers(2) == 1

    def adjust_contrast(img):
        return (img * rng.uniform(*contrast)).clamp(0, 255) if coin() else img

    if coin():
        image = (image + rng.uniform(-brightness, brightness)).clamp(0, 255)
    contrast_first = coin()
    if contrast_first:
        image = adjust_contrast(image)
    if coin():
        h, s, v = rgb_to_hsv(image / 255)
        image = hsv_to_rgb(h, (s * rng.uniform(*saturation)).clamp(0, 1), v) * 255
    if coin():
        h, s, v = rgb_to_hsv(image / 255)
        image = hsv_to_rgb((h + int(rng.integers(-hue, hue)) / 180) % 1, s, v) * 255
    if not contrast_first:
        image = adjust_contrast(image)
    return image


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    crop_size: tuple[int, int], ratio_range=(0.5, 2.0), base_size=None,
                    cat_max_ratio: float = 0.75, photometric: bool = True):
    """The release's augmentation, in its order: random rescale, random crop (cat_max_ratio),
    horizontal flip, photometric distortion, normalize, pad to the crop size (0 / 255).

    Returns image (3, crop_h, crop_w) float32, label (crop_h, crop_w) int64."""
    img, lbl = to_tensors(image, label)
    img, lbl = random_rescale(img, lbl, rng, ratio_range, base_size)
    img, lbl = random_crop(img, lbl, rng, crop_size, cat_max_ratio)
    img, lbl = random_flip(img, lbl, rng)
    if photometric:
        img = photometric_distortion(img, rng)
    return pad(normalize(img), lbl, crop_size)


def eval_transform(image: np.ndarray, label: np.ndarray | None = None, eval_size=None):
    """Whole-image inference input: resized to fit `eval_size` = (long, short) keeping the aspect
    ratio (None: as is), normalized. The label keeps its original size: predictions are scored
    at the resolution of the annotation.

    Returns image (3, h, w) float32 and label (H, W) int64 (or None)."""
    img, lbl = to_tensors(image, label)
    if eval_size is not None:
        img, _ = resize(img, None, keep_ratio_size(*img.shape[1:], eval_size))
    return normalize(img), lbl
