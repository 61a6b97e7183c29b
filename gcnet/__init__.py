"""GCNet-S/M/L (CVPR 2025), training form; deploy with `reparam.fuse(model.eval())`.

    model = gcnet_s()                   # 19 classes, 2 Path3x3_1x1 per GCBlock
    deploy = reparam.fuse(model.eval()) # each GCBlock → one 3×3 conv + ReLU
"""
from .blocks import GCBlock, Path1x1_1x1, Path3x3_1x1
from .config import CONFIGS, GCNET_L, GCNET_M, GCNET_S, GCNetConfig
from .model import DAPPM, FACTORIES, GCNet, gcnet_l, gcnet_m, gcnet_s

__all__ = ["CONFIGS", "DAPPM", "FACTORIES", "GCBlock", "GCNET_L", "GCNET_M", "GCNET_S", "GCNet",
           "GCNetConfig", "Path1x1_1x1", "Path3x3_1x1", "gcnet_l", "gcnet_m", "gcnet_s"]
