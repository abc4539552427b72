"""The autograd contract every compiled kernel shares (FlashAttention's): forward returns `(out, lse)`;
backward recomputes the probabilities from the saved lse, with `delta = rowsum(dout * out)`."""
from __future__ import annotations

import torch


class LayoutAttention(torch.autograd.Function):
    """`LayoutAttention.apply(q, k, v, layout, scale, forward, backward)` where
    `forward(q, k, v, layout, scale) -> (out, lse)` and
    `backward(q, k, v, lse, grad_out, delta, layout, scale) -> (dq, dk, dv)`."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, forward, backward):
        out, lse = forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.kernel_backward = layout, scale, backward
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()
        dq, dk, dv = ctx.kernel_backward(q, k, v, lse, grad_out, delta, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None, None, None
