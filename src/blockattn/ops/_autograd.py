"""The autograd contract every kernel shares (FlashAttention's): forward returns `(out, lse)`;
backward recomputes the probabilities from the saved lse, with `delta = rowsum(dout * out) - dlse`.

Why `- dlse`: d lse_i / d s_ij = p_ij, so a gradient arriving through lse adds `p_ij * dlse_i` to the
score gradient `p_ij * (dp_ij - rowsum(dout * out)_i)`; folding it into delta makes `lse` differentiable
(two calls over disjoint key sets then merge into one exact softmax, forward and backward) at no cost
to the kernels.
"""
from __future__ import annotations

import torch


class LayoutAttention(torch.autograd.Function):
    """`LayoutAttention.apply(q, k, v, layout, scale, forward, backward)` where
    `forward(q, k, v, layout, scale) -> (out, lse)` and
    `backward(q, k, v, lse, grad_out, delta, layout, scale) -> (dq, dk, dv)`; `layout` is whatever the
    kernel's forward and backward take (a BlockLayout, or a backend's per-call plan)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, forward, backward):
        out, lse = forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.kernel_backward = layout, scale, backward
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        work = torch.promote_types(out.dtype, torch.float32)
        delta = (grad_out.to(work) * out.to(work)).sum(-1)
        if grad_lse is not None:
            # rows with no key (lse = -inf) have no probabilities for the lse gradient to reach
            delta = delta - torch.where(torch.isinf(lse), 0.0, grad_lse.to(work))
        dq, dk, dv = ctx.kernel_backward(q, k, v, lse, grad_out, delta.contiguous(), ctx.layout, ctx.scale)
        return dq, dk, dv, None, None, None, None
