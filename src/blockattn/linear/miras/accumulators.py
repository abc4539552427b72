"""Every token's memory accumulator inside one chunk, kept implicit, and read out without autograd-in-autograd.

Inside a chunk of C tokens (`chunk.py`) every gradient is taken at the chunk-start weights, so each
token's gradient of a memory matrix is one outer product a_r ⊗ b_r, and the linear decay and
momentum recurrences give, per matrix,

    A_t = Σ_j coefs[t, j] · base_j + Σ_{r≤t} mix[t, r] · a_r ⊗ b_r        (mix lower triangular)

with the chunk-start accumulator (and momentum) as the bases. `matvec` computes A_t h_t from this
form in O(C² + C·P) without forming any A_t: enough for W = A (Titans, Yaad) and for Moneta's
W = A / ‖A‖_q^(q−2), whose scalar needs only `power_sums`. Memora's row softmax needs every A_t:
`softmax_matvec` forms them in one batched product and has a hand-written backward (recomputing
nothing and keeping only the softmax), so a training step makes a few passes over the `[C, P]`
per-token weights instead of autograd's many.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.linear.miras.parts import flatten, unflatten


def _dense(coefs, bases, mix, a, b):
    """Every token's matrix `[N, C, r, c]` from coefs `[N, C, nb]`, bases `[N, nb, r, c]`, mix `[N, C, C]`,
    a `[N, C, r]`, b `[N, C, c]`."""
    scaled = mix.unsqueeze(-1) * a.unsqueeze(1)  # [N, t, s, r] = mix[t, s] a_s
    out = scaled.transpose(-1, -2) @ b.unsqueeze(1)  # Σ_s mix[t, s] a_s ⊗ b_s
    return out.add_((coefs @ bases.flatten(2)).view_as(out))


def _dense_backward(grad, coefs, bases, mix, a, b):
    """Gradients of ⟨grad, _dense(...)⟩ with respect to (coefs, bases, mix, a, b); grad `[N, C, r, c]`."""
    flat = grad.flatten(2)
    d_coefs = flat @ bases.flatten(2).transpose(-1, -2)
    d_bases = (coefs.transpose(-1, -2) @ flat).view_as(bases)
    x = grad @ b.transpose(-1, -2).unsqueeze(1)  # [N, t, r, s] = grad_t b_s
    y = a.unsqueeze(1) @ grad  # [N, t, s, c] = a_s^T grad_t
    d_mix = (x * a.transpose(-1, -2).unsqueeze(1)).sum(-2)
    d_a = (x * mix.unsqueeze(-2)).sum(1).transpose(-1, -2)
    d_b = (y * mix.unsqueeze(-1)).sum(1)
    return d_coefs, d_bases, d_mix, d_a, d_b


class _SoftmaxMatvec(torch.autograd.Function):
    """y_t = softmax_rows(A_t) h_t; dA_t = S ⊙ dy_i (h_j − y_i), dh_t = S_tᵀ dy_t."""

    @staticmethod
    def forward(ctx, coefs, bases, mix, a, b, h):
        probs = torch.softmax(_dense(coefs, bases, mix, a, b), dim=-1)
        out = (probs @ h.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(coefs, bases, mix, a, b, h, probs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        coefs, bases, mix, a, b, h, probs, out = ctx.saved_tensors
        grad = (h.unsqueeze(-2) - out.unsqueeze(-1)).mul_(grad_out.unsqueeze(-1)).mul_(probs)
        d_h = (probs.transpose(-1, -2) @ grad_out.unsqueeze(-1)).squeeze(-1)
        return (*_dense_backward(grad, coefs, bases, mix, a, b), d_h)


class _PowerSums(torch.autograd.Function):
    """s_t = Σ |A_t|^p over the whole matrix; ds/dA_t = p·sign(A_t)|A_t|^(p−1)."""

    @staticmethod
    def forward(ctx, coefs, bases, mix, a, b, p):
        dense = _dense(coefs, bases, mix, a, b)
        ctx.save_for_backward(coefs, bases, mix, a, b, dense)
        ctx.p = p
        if p == 4:  # Moneta's default: two squarings, several times faster than a float power
            squared = dense.square()
            return torch.linalg.vecdot(squared.flatten(2), squared.flatten(2))
        return (dense.abs() ** p).sum((-1, -2))

    @staticmethod
    def backward(ctx, grad_out):
        coefs, bases, mix, a, b, dense = ctx.saved_tensors
        p = ctx.p
        if p == 4:
            grad = dense.square().mul_(dense)
        else:
            grad = dense.abs().pow_(p - 1).mul_(dense.sign())
        grad.mul_((p * grad_out)[..., None, None])
        return (*_dense_backward(grad, coefs, bases, mix, a, b), None)


class ChunkAccumulators:
    """One chunk's per-token accumulators in the implicit form above, for every memory matrix.

    `bases` are flat `[N, P]` tensors (the chunk-start accumulator, and momentum), `coefs` `[N, C, nb]`
    their per-token weights, `factors[i] = (a [N, C, r], b [N, C, c])` matrix i's gradient factors."""

    def __init__(self, shapes, coefs: Tensor, bases: list[Tensor], mix: Tensor, factors: list[tuple[Tensor, Tensor]]):
        self.shapes, self.coefs, self.mix, self.factors = shapes, coefs, mix, factors
        self.bases = [torch.stack(mats, dim=1) for mats in zip(*(unflatten(base, shapes) for base in bases))]

    def _args(self, i: int):
        return self.coefs, self.bases[i], self.mix, *self.factors[i]

    def matvec(self, i: int, h: Tensor) -> Tensor:
        """A_t h_t for h `[N, C, c]` -> `[N, C, r]`: a C × C mix of the factors, no A_t formed."""
        a, b = self.factors[i]
        out = (self.mix * (h @ b.transpose(-1, -2))) @ a
        for j in range(self.coefs.shape[-1]):
            out = out + self.coefs[..., j, None] * (h @ self.bases[i][:, j].transpose(-1, -2))
        return out

    def power_sums(self, i: int, p: float) -> Tensor:
        """Σ |A_t|^p over each token's whole matrix, `[N, C]`."""
        return _PowerSums.apply(*self._args(i), p)

    def softmax_matvec(self, i: int, h: Tensor) -> Tensor:
        """softmax(A_t) h_t, the softmax over each row: `[N, C, r]`."""
        return _SoftmaxMatvec.apply(*self._args(i), h)

    def combine(self, coefs: Tensor, mix: Tensor) -> Tensor:
        """Σ_j coefs[j] base_j + Σ_r mix[r] a_r ⊗ b_r for coefs `[N, nb]`, mix `[N, C]`: flat `[N, P]`."""
        return flatten([(coefs[..., None, None] * base).sum(1) + (a * mix.unsqueeze(-1)).transpose(-1, -2) @ b
                        for base, (a, b) in zip(self.bases, self.factors)])
