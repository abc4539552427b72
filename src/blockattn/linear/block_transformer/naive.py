"""Block Transformer one token at a time, from the definition."""
from __future__ import annotations

import torch


def block_transformer_naive(q, k, v, block_size: int = 4, scale: float | None = None):
    batch, heads, length, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale

    def attend(query, keys, values):
        weights = torch.softmax(torch.einsum("bhd,bhnd->bhn", query, keys) * scale, dim=-1)
        return torch.einsum("bhn,bhne->bhe", weights, values)

    out = []
    for t in range(length):
        block, start = t // block_size, (t // block_size) * block_size
        y = attend(q[:, :, t], k[:, :, start:t + 1], v[:, :, start:t + 1])
        if block > 0:
            pooled = [x[:, :, :start].reshape(batch, heads, block, block_size, -1).mean(3) for x in (q, k, v)]
            y = y + attend(pooled[0][:, :, -1], pooled[1], pooled[2])
        out.append(y)
    return torch.stack(out, dim=2)
