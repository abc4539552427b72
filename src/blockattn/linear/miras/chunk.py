"""Chunked-parallel training form of a Miras memory: equals `naive.py` token for token.

Inside a chunk of C tokens every gradient is taken at the chunk-start weights W_ref (the
Titans/Miras parallel training rule), so all C gradients come from one batched closed-form
backward, each a rank-one outer product a_r ⊗ b_r per memory matrix. The momentum and decay
recurrences are linear, so they unroll into lower-triangular decay matrices, E[t, s] =
Π_{s<j≤t} η_j, and every token's accumulator is A_t = (chunk-start terms) + Σ_{r≤t} F[t, r] a_r ⊗ b_r.
The read-out y_t = M_{φ(A_t)}(q_t) never forms A_t where φ is linear (W_t h = A_t h is a C × C
"attention" over the factors, as in the Titans paper's parallel form); Moneta's ℓ_q map needs
only every A_t's norm, Memora's softmax every A_t itself (`accumulators.py`). Only the chunk
boundary is sequential: O(L/C) steps.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.linear.miras.accumulators import ChunkAccumulators
from blockattn.linear.miras.common import MemoryState, MirasParts, check_inputs
from blockattn.linear.miras.common import initial_state as make_state
from blockattn.linear.miras.parts import unflatten


def _decay_matrix(gates: Tensor) -> tuple[Tensor, Tensor]:
    """gates `[N, C]` in (0, 1] -> (E `[N, C, C]` with E[t, s] = Π_{s<j≤t} g_j for s ≤ t else 0, Π_{j≤t} g_j `[N, C]`)."""
    cum = torch.cumsum(torch.log(gates), dim=-1)
    size = gates.shape[-1]
    lower = torch.ones(size, size, dtype=torch.bool, device=gates.device).tril()
    diff = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~lower, float("-inf"))
    return torch.exp(diff), torch.exp(cum)


def memory_chunk(q: Tensor, k: Tensor, v: Tensor, *, parts: MirasParts, lr, decay, momentum=None, delta=None,
                 init: Tensor | None = None, chunk_size: int = 16, initial_state: MemoryState | None = None,
                 output_state: bool = False):
    """Chunked form. q, k `[B, H, L, Dk]`, v `[B, H, L, Dv]`, L a multiple of `chunk_size`; returns `[B, H, L, Dv]`."""
    lr, decay, momentum, delta = check_inputs(q, k, v, parts, init, lr, decay, momentum, delta, chunk_size, initial_state)
    batch, heads, length, d_k = q.shape
    d_v = v.shape[3]
    if length % chunk_size:
        raise ValueError(f"sequence length ({length}) must be a multiple of chunk_size ({chunk_size}) in the chunked form")
    state = initial_state if initial_state is not None else make_state(parts, init, batch, heads)
    if state.position % chunk_size:
        raise ValueError(f"initial_state must sit on a chunk boundary (position {state.position} is not a multiple "
                         f"of chunk_size {chunk_size}); continue it with memory_step instead")
    shapes = parts.memory.shapes(d_k, d_v)
    n = batch * heads
    q, k, v = (x.reshape(n, length, x.shape[3]) for x in (q, k, v))
    lr, decay = lr.reshape(n, length), decay.reshape(n, length)
    momentum = None if momentum is None else momentum.reshape(n, length)
    delta = None if delta is None else delta.reshape(n, length)
    accum, mom = state.accum, state.momentum
    ref = state.ref_weights
    outs = []
    for start in range(0, length, chunk_size):
        part = slice(start, start + chunk_size)
        ref = parts.retention.weights(accum, shapes)
        ref_mats = unflatten(ref, shapes)  # [N, r, c], shared by the chunk's tokens
        keys = k[:, part]
        pred = parts.memory.apply(lambda i, h: h @ ref_mats[i].transpose(-1, -2), keys)
        grad_out = parts.bias.grad(pred, v[:, part], None if delta is None else delta[:, part])
        factors = parts.memory.grad_factors(ref_mats, keys, grad_out)
        lr_row = lr[:, part].unsqueeze(-2)
        e_dec, p_dec = _decay_matrix(decay[:, part])
        if momentum is not None:
            # S_t = P_t S_0 − Σ_r Em[t, r] θ_r g_r, A_t = p_t A_0 + Σ_s E[t, s] S_s
            e_mom, p_mom = _decay_matrix(momentum[:, part])
            coefs = torch.stack([p_dec, (e_dec @ p_mom.unsqueeze(-1)).squeeze(-1)], dim=-1)
            chunk = ChunkAccumulators(shapes, coefs, [accum, mom], -(e_dec @ e_mom) * lr_row, factors)
            mom = chunk.combine(torch.stack([torch.zeros_like(p_mom[:, -1]), p_mom[:, -1]], dim=-1),
                                -e_mom[:, -1] * lr_row[:, 0])
        else:
            chunk = ChunkAccumulators(shapes, p_dec.unsqueeze(-1), [accum], -e_dec * lr_row, factors)
        accum = chunk.combine(chunk.coefs[:, -1], chunk.mix[:, -1])
        outs.append(parts.memory.apply(lambda i, h: parts.retention.chunk_matvec(chunk, i, h), q[:, part]))
    out = torch.cat(outs, dim=1).reshape(batch, heads, length, d_v)
    if not output_state:
        return out
    return out, MemoryState(accum=accum, momentum=mom, ref_weights=ref, position=state.position + length)
