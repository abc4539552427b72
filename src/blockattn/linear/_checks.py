"""Boundary checks shared by the linear ops: `[B, H, L, D]` tensors, one dtype and device."""
from __future__ import annotations

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_qkv(q, k, v, *, same_value_dim: bool = False) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, L, D], got shape {list(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, L, D] (feature dims must match), "
                         f"got {list(q.shape)} and {list(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in [B, H, L], got {list(v.shape)} for q {list(q.shape)}")
    if same_value_dim and v.shape[3] != q.shape[3]:
        raise ValueError(f"v must have the same head dim as q ({q.shape[3]}), got {v.shape[3]}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_causal(causal) -> None:
    if causal is not True:
        raise ValueError(f"this form is causal-only: causal must be True, got {causal!r}")
