"""BASED: Taylor (2nd-order) feature-map linear attention + sliding-window softmax attention.

Paper: Arora et al., "Simple linear attention language models balance the recall-throughput
tradeoff" (ICML 2024). Rule: q and k are projected to a small feature dimension (16 in the
paper) and mapped by φ(x) = [1, x/d^¼, (x⊗x)/(√2·√d)], so φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d),
the 2nd-order Taylor expansion of exp(q·k/√d); linear attention over φ is normalised by
φ(q)·Σφ(k) (always > 0 since 1 + x + x²/2 > 0). Exact softmax attention over a small window
(64 tokens in the paper) restores the precise local shifts linear attention blurs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

import blockattn
from blockattn.linear._checks import check_causal, check_positive_int, check_qkv
from blockattn.linear.lightning.chunk import _lightning_blocked


def taylor_feature_map(x: Tensor) -> Tensor:
    """`[..., d]` -> `[..., 1 + d + d²]` with φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)."""
    d = x.shape[-1]
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2 * d)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, second], dim=-1)


def taylor_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, block_size: int = 64, eps: float = 1e-12,
                            causal: bool = True) -> Tensor:
    """Causal normalised linear attention with the Taylor feature map, in blocks.

    Args:
        q, k: `[B, H, L, d]` (d = the feature dimension, 16 in the paper); v: `[B, H, L, Dv]`.

    Returns:
        `[B, H, L, Dv]`. The intra-block / inter-block split is Lightning's with decay 1; the
        normaliser rides along as an extra value column of ones.
    """
    check_qkv(q, k, v)
    check_causal(causal)
    check_positive_int("block_size", block_size)
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    v_aug = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    ones = torch.ones(q.shape[1], dtype=q.dtype, device=q.device)
    out, _ = _lightning_blocked(fq, fk, v_aug, ones, block_size, None)
    return out[..., :-1] / (out[..., -1:] + eps)


def based(q: Tensor, k: Tensor, v: Tensor, *, window: int = 64, block_size: int = 64, causal: bool = True) -> Tensor:
    """BASED token mixing: Taylor linear attention plus exact softmax attention over the last `window` tokens.

    Args:
        q, k: `[B, H, L, d]`, the small feature-dimension projections (paper: d = 16).
        v: `[B, H, L, d]`.
        window: sliding-window size in tokens, the query included: `window - 1` previous keys plus
            the query (tested against that dense band); computed by `blockattn.attention` on
            `patterns.sliding_window`. The official BASED convention differs by one: its "window 64"
            (`SlidingAttention(window_size=128)`, flash window (64, 0)) is 64 previous keys plus the
            query, i.e. `window=65` here.

    Returns:
        `[B, H, L, d]`, the sum of the two branches.

    This one-op sum (shared q/k for both branches) is a compact variant. The official model keeps
    linear attention, sliding-window attention and BaseConv as separate interleaved layers, and
    Zoology's MQAR BASED has no window at all; `blockattn.bench.mqar` builds both ("based",
    "based_zoology") from `taylor_linear_attention` and the engine.
    """
    check_qkv(q, k, v, same_value_dim=True)
    check_causal(causal)
    check_positive_int("window", window)
    length = q.shape[2]
    layout = blockattn.patterns.sliding_window(length, window=window)
    local = blockattn.attention(q, k, v, layout)
    return taylor_linear_attention(q, k, v, block_size=block_size) + local
