"""Softmax-weighted pooling through the block engine: `sum_n softmax(logits)_n * values_n`.

Several vision blocks attend with a *given* logit per key instead of a q.k score (PSA's
channel and spatial branches). That is one-query attention with `q = e_0`, `k_n = logit_n * e_0`
and scale 1, so `q . k_n = logit_n`; the engine then does the softmax and the weighted sum.
Values wider than the engine's head-dim limit are cut into equal chunks that run as heads
sharing the same logits.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

import blockattn
from blockattn.patterns import full

_MAX_CHUNK = 128


def softmax_pool(logits: Tensor, values: Tensor, *, backend: str = "auto") -> Tensor:
    """logits `[B, G, N]`, values `[B, G, N, Dv]` -> `[B, G, Dv]` (softmax over N, per (B, G))."""
    batch, groups, n, width = values.shape
    chunks = math.ceil(width / _MAX_CHUNK)
    d = math.ceil(width / chunks)
    v = torch.nn.functional.pad(values, (0, chunks * d - width))
    v = v.reshape(batch, groups, n, chunks, d).permute(0, 1, 3, 2, 4).reshape(batch, groups * chunks, n, d)
    k = torch.zeros_like(v)
    k[..., 0] = logits.repeat_interleave(chunks, dim=1)
    q = torch.zeros(batch, groups * chunks, 1, d, dtype=v.dtype, device=v.device)
    q[..., 0] = 1.0
    out = blockattn.attention(q, k, v.contiguous(), full(1, n), scale=1.0, backend=backend)
    return out.reshape(batch, groups, chunks * d)[..., :width]
