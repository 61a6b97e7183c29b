"""Training-form re-parameterizable blocks, written from their papers, with no deploy code:
the deploy form of each is `reparam.fuse(block.eval())`, one convolution and its activation.

Every block takes (in_channels, out_channels, stride=1, groups=1, kernel_size=3, ...)."""
from __future__ import annotations

import torch
from torch import nn

from .acnet import ACBlock
from .dbb import DepthConcat, DiverseBranchBlock
from .mobileone import MobileOneBlock
from .orepa import OREPABlock
from .repvgg import RepVGGBlock
from .yolov6 import QARepVGGBlock, QARepVGGBlockV2

BLOCKS: dict[str, type[nn.Module]] = {
    "repvgg": RepVGGBlock,
    "acnet": ACBlock,
    "dbb": DiverseBranchBlock,
    "dbb_concat": DepthConcat,
    "mobileone": MobileOneBlock,
    "orepa": OREPABlock,
    "yolov6_qarepvgg": QARepVGGBlock,
    "yolov6_qarepvgg_v2": QARepVGGBlockV2,
}


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random statistics and perturbed affine parameters, in place.

    Fresh BNs (mean 0, var 1, weight 1, bias 0) are the identity in eval mode, which would hide
    every BN-folding mistake. The affine parameters are scaled around their initial values, not
    replaced, so a deep model's init (timm starts RepVGG's BN weights near 0.1) stays stable."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.mul_(torch.rand(n, generator=g) + 0.5)
                m.bias.add_(torch.randn(n, generator=g) * 0.1)
    return model


__all__ = ["BLOCKS", "ACBlock", "DepthConcat", "DiverseBranchBlock", "MobileOneBlock", "OREPABlock",
           "QARepVGGBlock", "QARepVGGBlockV2", "RepVGGBlock", "randomize_norms"]
