"""The obviously-correct definition of Lightning Attention: one token at a time."""
from __future__ import annotations

import torch
from torch import Tensor


def lightning_attention_naive(q: Tensor, k: Tensor, v: Tensor, decay: Tensor,
                              initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """o_t = q_t · S_t with S_t = λ_h S_{t−1} + k_tᵀ v_t; returns (o [B, H, L, Dv], S_L [B, H, Dk, Dv])."""
    batch, heads, length, dk = q.shape
    lam = decay.to(q.dtype).view(1, heads, 1, 1)
    state = q.new_zeros(batch, heads, dk, v.shape[3]) if initial_state is None else initial_state
    outs = []
    for t in range(length):
        state = lam * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
    return torch.stack(outs, dim=2), state
