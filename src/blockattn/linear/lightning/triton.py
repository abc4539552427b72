"""Lightning Attention-2 forward as one Triton kernel (GPU; runs on CPU under TRITON_INTERPRET=1).

One program per (batch, head) walks the blocks in order, keeping the `[Dk, Dv]` state in
registers: intra-block attention with the decay mask, plus the decayed state for the past.
The backward recomputes through the blocked PyTorch form, whose autograd is the same
intra/inter split in reverse.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lightning_fwd_kernel(Q, K, V, LOG_LAM, S0, O, S_OUT, length,
                          HEADS: tl.constexpr, BLOCK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          HAS_S0: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    head = pid % HEADS
    log_lam = tl.load(LOG_LAM + head)
    q_base = Q + pid * length * DK
    k_base = K + pid * length * DK
    v_base = V + pid * length * DV
    o_base = O + pid * length * DV
    offs_t = tl.arange(0, BLOCK)
    offs_dk = tl.arange(0, DK)
    offs_dv = tl.arange(0, DV)
    if HAS_S0:
        state = tl.load(S0 + pid * DK * DV + offs_dk[:, None] * DV + offs_dv[None, :]).to(tl.float32)
    else:
        state = tl.zeros((DK, DV), dtype=tl.float32)
    diff = (offs_t[:, None] - offs_t[None, :]).to(tl.float32)
    intra_mask = tl.where(diff >= 0, tl.exp(tl.maximum(diff, 0.0) * log_lam), 0.0)
    q_decay = tl.exp((offs_t + 1).to(tl.float32) * log_lam)
    for start in range(0, length, BLOCK):
        rows = start + offs_t
        valid = rows < length
        q = tl.load(q_base + rows[:, None] * DK + offs_dk[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        k = tl.load(k_base + rows[:, None] * DK + offs_dk[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_base + rows[:, None] * DV + offs_dv[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra_mask
        out = (tl.dot(scores, v, input_precision=PRECISION)
               + tl.dot(q * q_decay[:, None], state, input_precision=PRECISION))
        tl.store(o_base + rows[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])
        # A short tail block decays the state by its own length only.
        n_valid = tl.minimum(length - start, BLOCK)
        k_decay = tl.exp(tl.maximum(n_valid - 1 - offs_t, 0).to(tl.float32) * log_lam)
        state = (tl.exp(n_valid.to(tl.float32) * log_lam) * state
                 + tl.dot(tl.trans(k * k_decay[:, None]), v, input_precision=PRECISION))
    tl.store(S_OUT + pid * DK * DV + offs_dk[:, None] * DV + offs_dv[None, :], state)


def _forward(q, k, v, lam, block_size, initial_state):
    batch, heads, length, dk = q.shape
    dv = v.shape[3]
    for name, d in (("Dk", dk), ("Dv", dv), ("block_size", block_size)):
        if d < 16 or d & (d - 1):
            raise ValueError(f"the Triton kernel needs {name} to be a power of two >= 16, got {d}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(batch, heads, length, dv, dtype=q.dtype, device=q.device)
    state_out = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=q.device)
    s0 = initial_state.contiguous().float() if initial_state is not None else state_out
    log_lam = torch.log(lam.float()).contiguous()
    _lightning_fwd_kernel[(batch * heads,)](q, k, v, log_lam, s0, out, state_out, length,
                                            HEADS=heads, BLOCK=block_size, DK=dk, DV=dv,
                                            HAS_S0=initial_state is not None,
                                            # TF32 would cost fp32 inputs ~1e-3 relative error; the state accumulates it.
                                            PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return out, state_out.to(q.dtype)


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lam, initial_state, block_size):
        ctx.save_for_backward(q, k, v, lam, initial_state)
        ctx.block_size = block_size
        return _forward(q, k, v, lam, block_size, initial_state)

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        from blockattn.linear.lightning.chunk import _lightning_blocked
        q, k, v, lam, initial_state = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                      for t in (q, k, v, lam, initial_state)]
            out, state = _lightning_blocked(*leaves[:4], ctx.block_size, leaves[4])
            inputs = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad((out, state), inputs, (grad_out, grad_state), allow_unused=True))
        return (*[next(grads) if t is not None and t.requires_grad else None for t in leaves], None)


def lightning_attention_triton(q, k, v, lam, *, block_size: int = 64, initial_state=None):
    """Triton forward (and recomputing backward) of `lightning_attention`; same arguments."""
    return _LightningTriton.apply(q, k, v, lam, initial_state, block_size)
