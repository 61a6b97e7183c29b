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


def random_crop(image, label, rng: np.random.Generator, size: tuple[int, int]):
    """A `size` = (h, w) window at a random place; smaller inputs are padded at the bottom and
    right first, the image with 0 and the label with 255 (ignored, so padding teaches nothing)."""
    ch, cw = size
    h, w = image.shape[1:]
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        h, w = h + pad_h, w + pad_w
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


def random_flip(image, label, rng: np.random.Generator, p: float = 0.5):
    if rng.random() < p:
        return image.flip(-1), label.flip(-1)
    return image, label


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    crop_size: tuple[int, int], ratio_range=(0.5, 2.0), base_size=None):
    """GCNET.md's augmentation: random rescale, random crop (padded), horizontal flip, normalize.

    Returns image (3, crop_h, crop_w) float32, label (crop_h, crop_w) int64."""
    img, lbl = to_tensors(image, label)
    img, lbl = random_rescale(img, lbl, rng, ratio_range, base_size)
    img, lbl = random_crop(img, lbl, rng, crop_size)
    img, lbl = random_flip(img, lbl, rng)
    return normalize(img), lbl


def eval_transform(image: np.ndarray, label: np.ndarray | None = None, eval_size=None):
    """Whole-image inference input: resized to fit `eval_size` = (long, short) keeping the aspect
    ratio (None: as is), normalized. The label keeps its original size: predictions are scored
    at the resolution of the annotation.

    Returns image (3, h, w) float32 and label (H, W) int64 (or None)."""
    img, lbl = to_tensors(image, label)
    if eval_size is not None:
        img, _ = resize(img, None, keep_ratio_size(*img.shape[1:], eval_size))
    return normalize(img), lbl
