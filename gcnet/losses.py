"""Online hard example mining (OHEM) cross entropy and GCNet's main + auxiliary loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import IGNORE_INDEX


class OhemCrossEntropy(nn.Module):
    """Cross entropy averaged over the hard pixels only, as the release's `OhemCrossEntropy`.

    A pixel is hard when the softmax probability of its true class is below a threshold: the
    larger of `thresh` and the probability ranked `min_kept` (0-based) from the hardest among
    the valid pixels of the WHOLE call (all images of the batch together, not per image), so
    about `min_kept` pixels still count late in training, when most pixels are easy.
    `class_weight` (K,) scales each pixel's loss by its true class's weight; the mean is a plain
    mean over the kept pixels (mmseg's `reduction='none'` then `.mean()`), and the ranking uses
    the unweighted probabilities. Strict `<` as the release; when no pixel is hard the loss is 0
    (the release's mean of nothing would be NaN).

    logits (N, K, h, w), at any resolution: upsampled bilinearly to the label size first.
    labels (N, H, W) int64 with `ignore_index` for unlabeled pixels. Returns a scalar."""

    def __init__(self, thresh: float = 0.9, min_kept: int = 131072, ignore_index: int = IGNORE_INDEX,
                 class_weight=None):
        super().__init__()
        self.thresh, self.min_kept, self.ignore_index = thresh, min_kept, ignore_index
        self.register_buffer("class_weight", None if class_weight is None else torch.tensor(class_weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[2:] != labels.shape[1:]:
            logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
        valid = labels.flatten() != self.ignore_index
        if not valid.any():
            return logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
        pixel_loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none").flatten()[valid]
        with torch.no_grad():
            # p(true class) = exp(-CE); computing it from the loss avoids a second softmax.
            prob = torch.exp(-pixel_loss.detach())
            rank = min(self.min_kept, prob.numel() - 1)
            keep = prob < max(self.thresh, prob.kthvalue(rank + 1).values.item())
        if not keep.any():
            return logits.sum() * 0.0
        if self.class_weight is not None:
            pixel_loss = pixel_loss * self.class_weight[labels.flatten()[valid]]
        return pixel_loss[keep].mean()


class GCNetLoss(nn.Module):
    """main_weight · OHEM(main) + aux_weight · OHEM(aux): GCNET.md's 1.0 and 0.4, the same
    threshold, min_kept and class weights for both (the release's two loss entries).

    outputs: (main logits, aux logits), each (N, K, h, w); labels (N, H, W).
    Returns (total, main, aux) scalars, the parts for logging."""

    def __init__(self, thresh: float = 0.9, min_kept: int = 131072, aux_weight: float = 0.4,
                 main_weight: float = 1.0, ignore_index: int = IGNORE_INDEX, class_weight=None):
        super().__init__()
        self.ohem = OhemCrossEntropy(thresh, min_kept, ignore_index, class_weight)
        self.main_weight, self.aux_weight = main_weight, aux_weight

    def forward(self, outputs, labels):
        main, aux = (self.ohem(o.float(), labels) for o in outputs)
        return self.main_weight * main + self.aux_weight * aux, main, aux
