"""Boundary checks shared by the linear ops: `[B, H, L, D]` tensors, one dtype and device."""
from __future__ import annotations

from blockattn._checks import check_qkv_tensors


def check_qkv(q, k, v, *, same_value_dim: bool = False) -> None:
    check_qkv_tensors(q, k, v)
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
