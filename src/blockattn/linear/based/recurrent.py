"""BASED decode: the linear branch keeps a fixed-size (state, normaliser) pair per head."""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.linear.based.chunk import taylor_feature_map


def based_linear_step(q: Tensor, k: Tensor, v: Tensor, state: Tensor | None = None,
                      norm: Tensor | None = None, eps: float = 1e-12):
    """One token of Taylor linear attention.

    Args:
        q, k: `[B, H, 1, d]`; v: `[B, H, 1, Dv]`.
        state: `[B, H, 1 + d + d², Dv]` = Σ φ(k)ᵀv so far (None = empty); norm: `[B, H, 1 + d + d²]` = Σ φ(k).

    Returns:
        `(y [B, H, 1, Dv], state, norm)`; the sizes never grow with the sequence.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[2] != 1:
            raise ValueError(f"{name} must be [B, H, 1, D] for a decode step, got shape {list(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape (feature dims must match), got {list(q.shape)} and {list(k.shape)}")
    fq, fk = taylor_feature_map(q[:, :, 0]), taylor_feature_map(k[:, :, 0])
    expected = (*fk.shape, v.shape[3])
    if state is None:
        state, norm = q.new_zeros(expected), q.new_zeros(fk.shape)
    elif tuple(state.shape) != expected or norm is None or norm.shape != fk.shape:
        raise ValueError(f"state must be {list(expected)} and norm {list(fk.shape)}, got "
                         f"{list(state.shape)} and {None if norm is None else list(norm.shape)}")
    state = state + fk[..., None] * v[:, :, 0, None, :]
    norm = norm + fk
    y = torch.einsum("bhm,bhme->bhe", fq, state) / ((fq * norm).sum(-1, keepdim=True) + eps)
    return y[:, :, None], state, norm
