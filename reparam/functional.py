"""Out-of-place forms of in-place writes, called by graphs that `reparam.mutation` rewrote.

Each returns a new tensor and leaves its arguments alone; the write itself is done the way the
model did it (on a clone), so dtype, broadcasting and indexing rules stay those of the original.
"""
from __future__ import annotations

import torch


def setitem(x: torch.Tensor, index, value) -> torch.Tensor:
    """`x[index] = value`, on a copy of x."""
    out = x.clone()
    out[index] = value
    return out


def inplace(method: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`x.<method>(*args, **kwargs)` (an in-place method such as `copy_`), on a copy of x."""
    out = x.clone()
    getattr(out, method)(*args, **kwargs)
    return out


def scatter(base: torch.Tensor, value: torch.Tensor, method: str, *args, **kwargs) -> torch.Tensor:
    """A copy of `base` whose view `base.<method>(*args, **kwargs)` holds `value`: what a write
    into that view does to `base` itself."""
    # contiguous: a rewrite may have given `base` another layout, where `view` would raise
    out = base.clone(memory_format=torch.contiguous_format) if method in ("view", "view_as") else base.clone()
    getattr(out, method)(*args, **kwargs).copy_(value)
    return out


def scatter_piece(base: torch.Tensor, value: torch.Tensor, index, method: str, *args, **kwargs) -> torch.Tensor:
    """A copy of `base` whose piece `base.<method>(*args, **kwargs)[index]` (split, chunk,
    unbind: a tuple of views) holds `value`."""
    out = base.clone()
    getattr(out, method)(*args, **kwargs)[index].copy_(value)
    return out
