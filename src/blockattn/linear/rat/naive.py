"""RAT one token at a time: run the gated recurrence, attend over the stored chunk summaries."""
from __future__ import annotations

import torch


def rat_naive(q, k, v, forget, chunk_size: int = 16, scale: float | None = None, chunk_rope: bool = False):
    batch, heads, length, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    out = []
    summaries_k, summaries_v = [], []
    cur_k = cur_v = None
    for t in range(length):
        if t % chunk_size == 0:
            cur_k, cur_v = q.new_zeros(batch, heads, dim), q.new_zeros(batch, heads, v.shape[3])
        f = forget[:, :, t]
        cur_k = f * cur_k + (1 - f) * k[:, :, t]
        cur_v = f * cur_v + (1 - f) * v[:, :, t]
        query, key = q[:, :, t], cur_k
        if chunk_rope:  # InterRoPE: q and the summary keys turn by their chunk index
            query, key = (_rotate(x, t // chunk_size) for x in (query, key))
        keys = torch.stack(summaries_k + [key], dim=2)
        values = torch.stack(summaries_v + [cur_v], dim=2)
        weights = torch.softmax(torch.einsum("bhd,bhnd->bhn", query, keys) * scale, dim=-1)
        out.append(torch.einsum("bhn,bhne->bhe", weights, values))
        if t % chunk_size == chunk_size - 1:
            summaries_k.append(key)
            summaries_v.append(cur_v)
    return torch.stack(out, dim=2)


def _rotate(x, position: int, base: float = 10000.0):
    """Rotate-half RoPE of one vector per row `[..., D]` at an integer position, written out."""
    half = x.shape[-1] // 2
    inv = base ** (-torch.arange(0, x.shape[-1], 2, dtype=torch.float64) / x.shape[-1])
    cos, sin = (f(position * inv).to(x.dtype) for f in (torch.cos, torch.sin))
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
