"""Chunked-parallel training form of a Miras memory: equals `naive.py` token for token.

Inside a chunk of C tokens every gradient is taken at the chunk-start weights W_ref (the
Titans/Miras parallel training rule), so all C gradients come from one batched closed-form
backward. The momentum and decay recurrences are linear, so they unroll into lower-triangular
decay matrices, E[t, s] = Π_{s<j≤t} η_j, applied with one matmul per chunk; the retention map
φ then gives every token's weights W_t, and y_t = M_{W_t}(q_t) is one batched forward.
Only the chunk boundary is sequential: time O(L/C) steps of O(C²·P) work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.linear.miras.common import MemoryState, MirasParts, check_inputs
from blockattn.linear.miras.common import initial_state as make_state
from blockattn.linear.miras.parts import flatten, unflatten


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
        ref_mats = [m.unsqueeze(1) for m in unflatten(ref, shapes)]
        pred = parts.memory.forward(ref_mats, k[:, part])
        grad_out = parts.bias.grad(pred, v[:, part], None if delta is None else delta[:, part])
        update = lr[:, part, None] * flatten(parts.memory.backward(ref_mats, k[:, part], grad_out))
        if momentum is not None:
            e_mom, p_mom = _decay_matrix(momentum[:, part])
            moms = p_mom[..., None] * mom[:, None] - e_mom @ update
            incoming = moms
            mom = moms[:, -1]
        else:
            incoming = -update
        e_dec, p_dec = _decay_matrix(decay[:, part])
        accums = p_dec[..., None] * accum[:, None] + e_dec @ incoming
        accum = accums[:, -1]
        weights = parts.retention.weights(accums, shapes)
        outs.append(parts.memory.forward(unflatten(weights, shapes), q[:, part]))
    out = torch.cat(outs, dim=1).reshape(batch, heads, length, d_v)
    if not output_state:
        return out
    return out, MemoryState(accum=accum, momentum=mom, ref_weights=ref, position=state.position + length)
