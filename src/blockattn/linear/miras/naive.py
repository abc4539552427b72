"""The obviously-correct token loop of a Miras memory (and of Titans, one of its instances).

Per token t, with W_ref the weights at the start of t's chunk (chunk_size = 1: the fully
sequential rule): g_t = ∇_W ℓ(M_W(k_t), v_t) at W_ref (by autograd, independent of the closed
forms `chunk.py` uses); momentum rule S_t = η_t S_{t−1} − θ_t g_t, A_t = a_t A_{t−1} + S_t (plain
descent A_t = a_t A_{t−1} − θ_t g_t); W_t = φ(A_t) by the retention gate; y_t = M_{W_t}(q_t).
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.linear.miras.common import MemoryState, MirasParts, check_inputs
from blockattn.linear.miras.common import initial_state as make_state
from blockattn.linear.miras.parts import unflatten


def memory_step(parts: MirasParts, state: MemoryState, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, decay: Tensor,
                momentum: Tensor | None, delta: Tensor | None, chunk_size: int) -> tuple[Tensor, MemoryState]:
    """One token for `[N, D]` rows and `[N]` gates; returns `(y [N, Dv], new state)`."""
    shapes = parts.memory.shapes(k.shape[-1], v.shape[-1])
    ref = state.ref_weights
    if state.position % chunk_size == 0:
        ref = parts.retention.weights(state.accum, shapes)
    track = torch.is_grad_enabled()
    with torch.enable_grad():
        w = ref if ref.requires_grad else ref.detach().requires_grad_()
        pred = parts.memory.forward(unflatten(w, shapes), k)
        grad_out = parts.bias.grad(pred, v, delta)
        (grad,) = torch.autograd.grad(pred, w, grad_outputs=grad_out, create_graph=track)
    if not track:
        grad = grad.detach()
    update = lr[:, None] * grad
    mom = state.momentum
    if momentum is not None:
        mom = momentum[:, None] * mom - update
        accum = decay[:, None] * state.accum + mom
    else:
        accum = decay[:, None] * state.accum - update
    weights = parts.retention.weights(accum, shapes)
    y = parts.memory.forward(unflatten(weights, shapes), q)
    return y, MemoryState(accum=accum, momentum=mom, ref_weights=ref, position=state.position + 1)


def memory_naive(q: Tensor, k: Tensor, v: Tensor, *, parts: MirasParts, lr, decay, momentum=None, delta=None,
                 init: Tensor | None = None, chunk_size: int = 16, initial_state: MemoryState | None = None,
                 output_state: bool = False):
    """Token loop. q, k `[B, H, L, Dk]`, v `[B, H, L, Dv]`, gates floats or `[B, H, L]`; returns `[B, H, L, Dv]`."""
    lr, decay, momentum, delta = check_inputs(q, k, v, parts, init, lr, decay, momentum, delta, chunk_size, initial_state)
    batch, heads, length, _ = q.shape
    state = initial_state if initial_state is not None else make_state(parts, init, batch, heads)
    flat = [None if x is None else x.reshape(batch * heads, length, *x.shape[3:]) for x in (q, k, v, lr, decay, momentum, delta)]
    outs = []
    for t in range(length):
        y, state = memory_step(parts, state, *[None if x is None else x[:, t] for x in flat], chunk_size)
        outs.append(y)
    out = torch.stack(outs, dim=1).reshape(batch, heads, length, v.shape[3])
    return (out, state) if output_state else out
