"""RAT: a gated linear recurrence within chunks, softmax attention across chunk summaries.

Paper: Wei, Yadav, Pascanu, Gulcehre, "RAT: Bridging RNN Efficiency and Attention Accuracy in
Language Modeling" (2025). Rule: the sequence is cut into chunks of C tokens (C = 16 in the
paper). Inside a chunk, keys and values are running gated averages,
k̃_t = f_t ⊙ k̃_{t−1} + (1 − f_t) ⊙ k_t (the same for v), restarted at each chunk. Query t
then takes a softmax over the final (k̃, ṽ) of every earlier chunk plus its own chunk's
current (k̃_t, ṽ_t): attention sees L/C summaries instead of L tokens. The paper's hybrid
interleaves RAT layers with local (sliding-window) attention layers. With `chunk_rope`, q and
every key summary are rotated by their chunk index (the official "interrope", rotate-half RoPE,
base 10000), so chunk scores depend on the chunk distance.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.linear._checks import check_causal, check_positive_int, check_qkv


def check_forget(forget, like: Tensor) -> None:
    if not isinstance(forget, Tensor):
        raise TypeError(f"forget must be a torch.Tensor [B, H, L, D], got {type(forget).__name__}")
    if forget.shape != like.shape:
        raise ValueError(f"forget must have the shape of k {list(like.shape)}, got {list(forget.shape)}")
    if not bool(((forget >= 0) & (forget <= 1)).all()):
        raise ValueError("forget must lie in [0, 1] (e.g. a sigmoid output)")


def intra_chunk_recurrence(x: Tensor, forget: Tensor, chunk_size: int) -> Tensor:
    """x̃_t = f_t x̃_{t−1} + (1 − f_t) x_t restarted every `chunk_size` tokens; all chunks advance together."""
    batch, heads, length, dim = x.shape
    n = length // chunk_size
    xc = x.reshape(batch, heads, n, chunk_size, dim)
    fc = forget.reshape(batch, heads, n, chunk_size, forget.shape[3])
    state = torch.zeros_like(xc[:, :, :, 0])
    steps = []
    for t in range(chunk_size):
        state = fc[:, :, :, t] * state + (1 - fc[:, :, :, t]) * xc[:, :, :, t]
        steps.append(state)
    return torch.stack(steps, dim=3).reshape(batch, heads, length, dim)


def rat(q: Tensor, k: Tensor, v: Tensor, forget: Tensor, *, chunk_size: int = 16, scale: float | None = None,
        chunk_rope: bool = False, output_cache: bool = False, causal: bool = True):
    """Causal RAT attention.

    Args:
        q, k, v: `[B, H, L, D]`; L must be a multiple of `chunk_size`.
        forget: `[B, H, L, D]` gate in [0, 1] (a sigmoid of a projection in the layer).
        chunk_size: tokens per chunk (paper: 16). scale: score scale, default D**-0.5.
        chunk_rope: rotate q and the key summaries by their chunk index (official InterRoPE; D even).
        output_cache: also return the `RATCache` that `rat_step` continues decoding from.

    Returns:
        `[B, H, L, D]`. Time is O(L·D·C) for the recurrence plus O(L·L/C·D) for the attention.
    """
    check_qkv(q, k, v, same_value_dim=True)
    check_causal(causal)
    check_positive_int("chunk_size", chunk_size)
    check_forget(forget, k)
    length = q.shape[2]
    if length % chunk_size:
        raise ValueError(f"sequence length ({length}) must be a multiple of chunk_size ({chunk_size})")
    scale = q.shape[3] ** -0.5 if scale is None else scale
    n = length // chunk_size
    k_run = intra_chunk_recurrence(k, forget, chunk_size)
    v_run = intra_chunk_recurrence(v, forget, chunk_size)
    chunk_of = torch.arange(length, device=q.device) // chunk_size
    k_cur = k_run
    if chunk_rope:
        from blockattn.linear._rope import rotary
        # after the scan: the per-channel gate does not commute with the rotation
        q, k_cur = rotary(q, chunk_of), rotary(k_run, chunk_of)
    k_end = k_cur[:, :, chunk_size - 1::chunk_size]                       # [B, H, n, D]
    v_end = v_run[:, :, chunk_size - 1::chunk_size]
    earlier = chunk_of[:, None] > torch.arange(n, device=q.device)[None, :]   # only finished chunks
    scores_past = (q @ k_end.transpose(-1, -2) * scale).masked_fill(~earlier, float("-inf"))
    score_self = (q * k_cur).sum(-1, keepdim=True) * scale
    weights = torch.softmax(torch.cat([scores_past, score_self], dim=-1), dim=-1)
    out = weights[..., :n] @ v_end + weights[..., n:] * v_run
    if not output_cache:
        return out
    from blockattn.linear.rat.recurrent import RATCache
    return out, RATCache(k_end, v_end, k_run[:, :, -1], v_run[:, :, -1], length)  # current_k unrotated
