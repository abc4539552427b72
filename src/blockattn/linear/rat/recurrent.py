"""RAT decode: a cache of finished-chunk summaries plus the running (k̃, ṽ) of the current chunk."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RATCache:
    """Summaries `[B, H, n, D]` of the finished chunks, the current chunk's running state, tokens seen."""
    summaries_k: Tensor
    summaries_v: Tensor
    current_k: Tensor
    current_v: Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, dim: int, *, dtype=torch.float32, device=None) -> "RATCache":
        z = torch.zeros(batch, heads, 0, dim, dtype=dtype, device=device)
        s = torch.zeros(batch, heads, dim, dtype=dtype, device=device)
        return cls(z, z.clone(), s, s.clone(), 0)


def rat_step(q: Tensor, k: Tensor, v: Tensor, forget: Tensor, cache: RATCache, *, chunk_size: int = 16,
             scale: float | None = None, chunk_rope: bool = False) -> tuple[Tensor, RATCache]:
    """One token (`[B, H, 1, D]` each) of RAT; returns `(y [B, H, 1, D], cache)`. The cache grows by one
    summary per `chunk_size` tokens, the paper's C-fold smaller KV cache. With `chunk_rope` the stored
    summaries are rotated by their chunk index and the running key is kept unrotated."""
    for name, t in (("q", q), ("k", k), ("v", v), ("forget", forget)):
        if t.dim() != 4 or t.shape[2] != 1:
            raise ValueError(f"{name} must be [B, H, 1, D] for a decode step, got shape {list(t.shape)}")
    if not isinstance(cache, RATCache):
        raise TypeError(f"cache must be a RATCache, got {type(cache).__name__}")
    scale = q.shape[3] ** -0.5 if scale is None else scale
    restart = cache.length % chunk_size == 0
    cur_k = torch.zeros_like(cache.current_k) if restart else cache.current_k
    cur_v = torch.zeros_like(cache.current_v) if restart else cache.current_v
    f = forget[:, :, 0]
    cur_k = f * cur_k + (1 - f) * k[:, :, 0]
    cur_v = f * cur_v + (1 - f) * v[:, :, 0]
    key = cur_k[:, :, None]
    if chunk_rope:
        from blockattn.linear._rope import rotary
        chunk = torch.tensor([cache.length // chunk_size], device=q.device)
        q, key = rotary(q, chunk), rotary(key, chunk)
    keys = torch.cat([cache.summaries_k, key], dim=2)
    values = torch.cat([cache.summaries_v, cur_v[:, :, None]], dim=2)
    weights = torch.softmax((q @ keys.transpose(-1, -2)) * scale, dim=-1)
    y = weights @ values
    length = cache.length + 1
    if length % chunk_size == 0:
        cache = RATCache(keys, values, cur_k, cur_v, length)
    else:
        cache = RATCache(cache.summaries_k, cache.summaries_v, cur_k, cur_v, length)
    return y, cache
