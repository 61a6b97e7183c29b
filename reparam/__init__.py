"""reparam: collapse re-parameterizable multi-branch blocks into single convolutions with torch.fx."""
from .stats import Stats, count

__all__ = ["Stats", "count"]
