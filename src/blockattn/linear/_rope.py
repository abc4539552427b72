"""Rotary position embedding at arbitrary integer positions (rotate-half convention, as in Llama and RAT)."""
from __future__ import annotations

import torch
from torch import Tensor


def rotary(x: Tensor, positions: Tensor, *, base: float = 10000.0) -> Tensor:
    """Rotate `x [..., L, D]` (D even) by `positions [L]` (or broadcastable to `[..., L]`): pairs (i, i + D/2)
    turn by `position · base^(−2i/D)`, so `rotary(q, p)·rotary(k, s)` depends on `p − s` only."""
    if not isinstance(x, Tensor) or not isinstance(positions, Tensor):
        raise TypeError("x and positions must be torch.Tensors")
    dim = x.shape[-1]
    if dim % 2:
        raise ValueError(f"the last dim of x must be even for rotary embeddings, got {dim}")
    inv = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float64) / dim)
    angles = positions.to(device=x.device, dtype=torch.float64).unsqueeze(-1) * inv
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(x.dtype) for f in (torch.cos, torch.sin))
    half = dim // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
