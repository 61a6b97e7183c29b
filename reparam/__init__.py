"""reparam: collapse re-parameterizable multi-branch blocks into single convolutions with torch.fx.

    fused = reparam.fuse(model)                   # eval-mode, same function, fewer convs
    print(reparam.explain(model, (x,)))           # what was merged, what was left alone and why
    reparam.save(fused, "deploy.safetensors")     # the deploy form's weights only
"""
__version__ = "0.2.0"

from .deploy import load, save
from .fuse import InternalError, explain, fuse, fuse_with_report
from .report import Report
from .stats import Stats, count

__all__ = ["InternalError", "Report", "Stats", "__version__", "count", "explain", "fuse", "fuse_with_report",
           "load", "save"]
