"""Titans' chunked-parallel training form (see `naive.py` for the rule it equals token for token).

Inside a chunk all surprise gradients are one batched closed-form backward at the chunk-start
weights, and the momentum / forgetting recurrences become lower-triangular decay matrices
(`blockattn.linear.miras.chunk`): the paper's "parallelizable" memory training.
"""
from __future__ import annotations

from torch import Tensor

from blockattn.linear._checks import check_causal
from blockattn.linear.miras.chunk import memory_chunk
from blockattn.linear.miras.common import MemoryState
from blockattn.linear.titans.naive import Titans, forget_to_decay, resolve_init


def titans(q: Tensor, k: Tensor, v: Tensor, *, lr=0.1, momentum=0.9, forget=0.01, chunk_size: int = 16,
           expansion: int = 2, residual_norm: bool = False, init: Tensor | None = None,
           initial_state: MemoryState | None = None, output_state: bool = False, causal: bool = True):
    """Causal Titans memory read-out y_t = M_t(q_t).

    Args:
        q, k: `[B, H, L, Dk]` (the layer ℓ2-normalises them); v: `[B, H, L, Dv]`; L a multiple of `chunk_size`.
        lr, momentum, forget: θ_t ≥ 0, η_t in (0, 1), α_t in [0, 1): floats or `[B, H, L]` tensors.
        chunk_size: tokens whose gradients share the chunk-start weights. expansion: MLP hidden = expansion·Dk.
        residual_norm: memory x + LN(W₂ GELU(W₁x)) instead of W₂ silu(W₁x) (needs Dk == Dv).
        init: initial memory `[H, P]` (flat W1, W2); default a seeded fan-in normal.
        initial_state / output_state: continue from / return a `MemoryState` (decode with `titans_step`).

    Returns:
        `[B, H, L, Dv]` (and the state when `output_state`).
    """
    check_causal(causal)
    parts = Titans(expansion, residual_norm).parts
    return memory_chunk(q, k, v, parts=parts, lr=lr, decay=forget_to_decay(forget), momentum=momentum,
                        init=resolve_init(init, parts, q, v) if initial_state is None else None,
                        chunk_size=chunk_size, initial_state=initial_state, output_state=output_state)
