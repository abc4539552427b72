"""Lightning Attention decode: one token against a fixed-size `[B, H, Dk, Dv]` state."""
from __future__ import annotations

from torch import Tensor

from blockattn.linear.lightning.chunk import check_decay


def lightning_attention_step(q: Tensor, k: Tensor, v: Tensor, decay: Tensor,
                             state: Tensor) -> tuple[Tensor, Tensor]:
    """Advance the recurrence by one token.

    Args:
        q, k: `[B, H, 1, Dk]`; v: `[B, H, 1, Dv]`; decay: `[H]` λ in (0, 1];
        state: `[B, H, Dk, Dv]`, e.g. the `final_state` of a `lightning_attention` prefill.

    Returns:
        `(o [B, H, 1, Dv], new_state)` with new_state = λ·state + kᵀv and o = q·new_state,
        which is exactly what the prefill would have produced for this position.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[2] != 1:
            raise ValueError(f"{name} must be [B, H, 1, D] for a decode step, got shape {list(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {list(q.shape)} and {list(k.shape)}")
    batch, heads, _, dk = q.shape
    expected = (batch, heads, dk, v.shape[3])
    if tuple(state.shape) != expected:
        raise ValueError(f"state must have shape [B, H, Dk, Dv] = {list(expected)}, got {list(state.shape)}")
    lam = check_decay(decay, heads, q).view(1, heads, 1, 1)
    state = lam * state + k[:, :, 0, :, None] * v[:, :, 0, None, :]
    return (q[:, :, 0, None, :] @ state), state
