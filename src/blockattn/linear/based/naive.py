"""The token-by-token definition of BASED's normalised Taylor linear attention."""
from __future__ import annotations

import torch

from blockattn.linear.based.chunk import taylor_feature_map


def taylor_linear_attention_naive(q, k, v, eps: float = 1e-12):
    """y_t = φ(q_t)·S_t / (φ(q_t)·z_t + eps), S_t = Σ_{s≤t} φ(k_s)ᵀ v_s, z_t = Σ_{s≤t} φ(k_s)."""
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    batch, heads, length, m = fq.shape
    state = q.new_zeros(batch, heads, m, v.shape[3])
    norm = q.new_zeros(batch, heads, m)
    outs = []
    for t in range(length):
        state = state + fk[:, :, t, :, None] * v[:, :, t, None, :]
        norm = norm + fk[:, :, t]
        num = torch.einsum("bhm,bhme->bhe", fq[:, :, t], state)
        den = (fq[:, :, t] * norm).sum(-1, keepdim=True)
        outs.append(num / (den + eps))
    return torch.stack(outs, dim=2)
