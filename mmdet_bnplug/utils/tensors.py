"""Small tensor helpers shared by the norm layers and their ops: the statistics dtype,
cheap casts, per-channel broadcast views (argument checks are in ``checks.py``)."""
from typing import Optional

import torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-channel statistics: fp32 for half/bf16 (and fp32) input, fp64 for
    fp64 input."""
    return torch.promote_types(dtype, torch.float32)


def cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dtype)``, without a call when nothing changes (the common case); None
    stays None."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def channel_view(v: torch.Tensor, dim: int) -> torch.Tensor:
    """A per-channel ``(C,)`` tensor as ``(1, C, 1, ...)``, broadcastable against an
    ``(N, C, *)`` tensor of rank ``dim``."""
    return v.view((1, -1) + (1, ) * (dim - 2))


def reduce_dims(x: torch.Tensor) -> list:
    """Every axis of an ``(N, C, *)`` tensor but the channel axis."""
    return [0] + list(range(2, x.dim()))
