"""Exact triple-wise (tensor / Kronecker) softmax attention, O(n³): the oracle for the approximation.

Paper: Alman, Song, "How to Capture Higher-order Correlations? Generalizing Matrix Softmax
Attention to Kronecker Computation" (ICLR 2024). Rule: query i scores every *pair* of keys,
s(i, j1, j2) = ⟨q_i, k1_{j1} ⊙ k2_{j2}⟩ / d, i.e. A = exp(Q (K1 ⊘ K2)ᵀ / d) ∈ R^{n×n²} with ⊘ the
column-wise Kronecker product; the output is D⁻¹ A (V1 ⊘ V2), D = diag(A 1): a softmax over key
pairs averaging v1_{j1} ⊙ v2_{j2}. `causal=True` keeps pairs with j1, j2 ≤ i.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn._checks import check_float_tensors
from blockattn.linear._checks import check_positive_int



def check_tensor_attention(q, k1, k2, v1, v2, scale, causal) -> float:
    """Boundary checks for both forms; returns the score scale (default 1/d as in the paper)."""
    check_float_tensors(("q", q), ("k1", k1), ("k2", k2), ("v1", v1), ("v2", v2), dims="[B, H, n, d]")
    for name, t in (("k1", k1), ("k2", k2)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {list(q.shape)} (feature dims must match), got {list(t.shape)}")
    if v1.shape != v2.shape or v1.shape[:3] != q.shape[:3]:
        raise ValueError(f"v1 and v2 must share one shape [B, H, n, dv] matching q in [B, H, n]; got "
                         f"{list(v1.shape)} and {list(v2.shape)} for q {list(q.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        return 1.0 / q.shape[3]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def tensor_attention(q: Tensor, k1: Tensor, v1: Tensor, *, k2: Tensor | None = None, v2: Tensor | None = None,
                     scale: float | None = None, causal: bool = True, max_len: int = 256) -> Tensor:
    """Exact tensor attention. q, k1, k2 `[B, H, n, d]`, v1, v2 `[B, H, n, dv]` -> `[B, H, n, dv]`.

    k2, v2 default to k1, v1 (the `blockattn.linear.<method>(q, k, v)` form). Materialises the
    `[n, n, n]` score tensor per head, so n is capped by `max_len`."""
    k2 = k1 if k2 is None else k2
    v2 = v1 if v2 is None else v2
    scale = check_tensor_attention(q, k1, k2, v1, v2, scale, causal)
    check_positive_int("max_len", max_len)
    n = q.shape[2]
    if n > max_len:
        raise ValueError(f"exact tensor attention is O(n³): n ({n}) must be <= max_len ({max_len}); "
                         f"use tensor_attention_approx for long inputs")
    scores = torch.einsum("bhid,bhjd,bhkd->bhijk", q, k1, k2) * scale
    if causal:
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        pair = keep[:, :, None] & keep[:, None, :]
        scores = scores.masked_fill(~pair, float("-inf"))
    weights = torch.softmax(scores.flatten(-2), dim=-1).unflatten(-1, (n, n))
    return torch.einsum("bhijk,bhjd,bhkd->bhid", weights, v1, v2)
