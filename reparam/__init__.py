"""reparam: collapse re-parameterizable multi-branch blocks into single convolutions with torch.fx.

    fused = reparam.fuse(model)                   # eval-mode, same function, fewer convs
    print(reparam.explain(model, (x,)))           # what was merged, what was left alone and why
    train = reparam.expand(model, "dbb")          # a wider training form that fuses back to model's convs
    reparam.save(fused, "deploy.safetensors")     # the deploy form's weights only
"""
__version__ = "0.2.0"

from .deploy import load, save
from .expand import ExpandReport, expand, expand_with_report
from .fuse import InternalError, explain, fuse, fuse_with_report
from .report import Report
from .stats import Stats, count

__all__ = ["ExpandReport", "InternalError", "Report", "Stats", "__version__", "count", "expand", "expand_with_report",
           "explain", "fuse", "fuse_with_report", "load", "save"]
