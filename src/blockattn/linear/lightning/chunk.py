"""Lightning Attention 1/2 in blocked PyTorch: intra-block quadratic, inter-block running state.

Paper: Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
Lengths in Large Language Models" (2024), the attention of TransNormerLLM (Qin et al., 2023).
Rule: per head h with decay λ_h, o_t = q_t · Σ_{s≤t} λ_h^(t−s) k_sᵀ v_s. The sequence is cut
into blocks of C tokens; inside a block the masked product (q kᵀ ⊙ M) v with M_ts = λ^(t−s)
is computed like attention (Lightning-1), across blocks a `[Dk, Dv]` state carries the past
(Lightning-2), so time and memory grow linearly in L. Scaling and normalisation belong to the
layer, not to this op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.linear._checks import check_causal, check_positive_int, check_qkv


def check_decay(decay, heads: int, like: Tensor) -> Tensor:
    if not isinstance(decay, Tensor):
        raise TypeError(f"decay must be a torch.Tensor of shape [H], got {type(decay).__name__}")
    if decay.shape != (heads,):
        raise ValueError(f"decay must have shape [H] = [{heads}], got {list(decay.shape)}")
    if not decay.is_floating_point():
        raise TypeError(f"decay must be a floating tensor, got {decay.dtype}")
    if not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(f"decay must lie in (0, 1], got min {decay.min().item()} max {decay.max().item()}")
    return decay.to(device=like.device, dtype=like.dtype)


def _lightning_blocked(q, k, v, lam, block_size, initial_state):
    batch, heads, length, dk = q.shape
    dv = v.shape[3]
    pad = (-length) % block_size
    if pad:
        # Zero keys and values add nothing to the state; padded query rows are dropped.
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (length + pad) // block_size
    qb, kb, vb = (t.reshape(batch, heads, n, block_size, t.shape[3]) for t in (q, k, v))
    # Decays as exp(i·log λ): no division by λ^s, which would overflow for small λ.
    log_lam = torch.log(lam).view(1, heads, 1, 1, 1)
    pos = torch.arange(block_size, device=q.device, dtype=q.dtype)
    diff = (pos[:, None] - pos[None, :])
    intra_mask = torch.exp(diff.clamp(min=0) * log_lam) * (diff >= 0)      # [1, H, 1, C, C]
    q_decay = torch.exp((pos + 1)[:, None] * log_lam)                      # λ^(t+1): state is from before the block
    k_decay = torch.exp((block_size - 1 - pos)[:, None] * log_lam)         # λ^(C−1−s): decay to the block's end
    block_decay = torch.exp(block_size * log_lam)[:, :, 0]                 # [1, H, 1, 1]: λ^C per block step

    intra = ((qb @ kb.transpose(-1, -2)) * intra_mask) @ vb
    block_kv = (kb * k_decay).transpose(-1, -2) @ vb                      # [B, H, n, Dk, Dv]
    state = q.new_zeros(batch, heads, dk, dv) if initial_state is None else initial_state
    states = []
    for i in range(n):
        states.append(state)
        state = block_decay * state + block_kv[:, :, i]
    inter = (qb * q_decay) @ torch.stack(states, dim=2)
    if pad:
        # The padded tail would decay the final state by λ^pad too: rebuild it from the tail's real tokens.
        tail = block_size - pad
        tail_pos = pos[:tail]
        tail_decay = torch.exp((tail - 1 - tail_pos)[:, None] * log_lam[:, :, 0])
        state = (torch.exp(tail * log_lam[:, :, 0]) * states[-1]
                 + (kb[:, :, -1, :tail] * tail_decay).transpose(-1, -2) @ vb[:, :, -1, :tail])
    out = (intra + inter).reshape(batch, heads, n * block_size, dv)[:, :, :length]
    return out, state


def lightning_attention(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, *, block_size: int = 64,
                        initial_state: Tensor | None = None, output_final_state: bool = False,
                        backend: str = "auto", causal: bool = True):
    """Causal linear attention with per-head decay, o_t = q_t · Σ_{s≤t} λ_h^(t−s) k_sᵀ v_s.

    Args:
        q, k: `[B, H, L, Dk]`; v: `[B, H, L, Dv]`.
        decay: `[H]`, λ_h in (0, 1] (1 = plain causal linear attention).
        block_size: tokens per block (any length works; the tail block is padded).
        initial_state: optional `[B, H, Dk, Dv]` state to continue from.
        output_final_state: also return the `[B, H, Dk, Dv]` state after the last token,
            which `lightning_attention_step` continues exactly.
        backend: "auto" (Triton on CUDA, blocked PyTorch otherwise), "torch" or "triton".
        causal: must be True; the running-state form has no non-causal variant.

    Returns:
        `o [B, H, L, Dv]` (and the final state when asked). Differentiable in q, k, v, decay.
    """
    check_qkv(q, k, v)
    check_causal(causal)
    check_positive_int("block_size", block_size)
    batch, heads, _, dk = q.shape
    lam = check_decay(decay, heads, q)
    if initial_state is not None:
        expected = (batch, heads, dk, v.shape[3])
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be a tensor of shape [B, H, Dk, Dv] = {list(expected)}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from blockattn.linear.lightning.triton import lightning_attention_triton
        out, state = lightning_attention_triton(q, k, v, lam, block_size=block_size, initial_state=initial_state)
    else:
        out, state = _lightning_blocked(q, k, v, lam, block_size, initial_state)
    return (out, state) if output_final_state else out

