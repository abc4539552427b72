"""Boundary checks shared by every public entry point that takes q, k, v (or more attention tensors)."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_tensors(*named: tuple[str, object], dims: str = "[B, H, L, D]") -> None:
    """Each `(name, tensor)` is a 4-dim floating tensor; all share the first one's dtype and device."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims {dims}, got shape {list(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    (first, t0), rest = named[0], named[1:]
    for name, t in rest:
        if t.dtype != t0.dtype:
            raise TypeError(f"{name} must share {first}'s dtype {t0.dtype}, got {t.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{name} must be on {first}'s device {t0.device}, got {t.device}")


def check_qkv_tensors(q, k, v) -> None:
    """Each of q, k, v is a 4-dim `[B, H, L, D]` floating tensor; all share one dtype and device."""
    check_float_tensors(("q", q), ("k", k), ("v", v))
