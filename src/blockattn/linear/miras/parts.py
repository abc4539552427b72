"""Miras' four choices as composable parts: memory architecture, attentional bias, retention gate, learning rule.

Paper: Behrouz, Razaviyayn, Zhong, Mirrokni, "It's All Connected: A Journey Through Test-Time
Memorization, Attentional Bias, Retention, and Online Optimization" (2025). A sequence model is
an associative memory M_W updated per token by an online optimiser that lowers an attentional
bias ℓ(M_W(k_t), v_t) while a retention gate keeps W near its past. Every choice here keeps the
update *linear in an accumulator* A (W = φ(A)), which is what lets `chunk.py` train in parallel
inside a chunk exactly as the token loop in `naive.py` does.

Weights are carried flat: `[N, P]` with N = batch·heads, P = the memory's parameter count.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------- memory architectures

@dataclasses.dataclass(frozen=True)
class LinearMemory:
    """M_W(x) = W x, W `[Dv, Dk]` (linear attention / DeltaNet's memory)."""

    def shapes(self, d_k: int, d_v: int) -> list[tuple[int, int]]:
        return [(d_v, d_k)]

    def forward(self, mats: list[Tensor], x: Tensor) -> Tensor:
        return self.apply(dense_matvec(mats), x)

    def apply(self, matvec, x: Tensor) -> Tensor:
        return matvec(0, x)

    def grad_factors(self, mats: list[Tensor], x: Tensor, grad_out: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per token, the weight gradient of ⟨grad_out, M_W(x)⟩ as rank-one factors (see `MLPMemory`)."""
        return [(grad_out, x)]


@dataclasses.dataclass(frozen=True)
class MLPMemory:
    """M_W(x) = W2 silu(W1 x), W1 `[E·Dk, Dk]`, W2 `[Dv, E·Dk]` (Titans' deep memory, L_M = 2)."""

    expansion: int = 2

    def shapes(self, d_k: int, d_v: int) -> list[tuple[int, int]]:
        return [(self.expansion * d_k, d_k), (d_v, self.expansion * d_k)]

    def forward(self, mats: list[Tensor], x: Tensor) -> Tensor:
        return self.apply(dense_matvec(mats), x)

    def apply(self, matvec, x: Tensor) -> Tensor:
        return matvec(1, F.silu(matvec(0, x)))

    def grad_factors(self, mats: list[Tensor], x: Tensor, grad_out: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Weight gradients of ⟨grad_out, M_W(x)⟩ in closed form (no autograd inside the chunk).

        `mats` `[N, r, c]` are shared by the T tokens of x `[N, T, Dk]`, grad_out `[N, T, Dv]`. Every
        token's gradient of a matrix is an outer product a ⊗ b; returns one `(a [N, T, r], b [N, T, c])`
        per matrix, so the chunked form never forms the `[T, r, c]` gradients."""
        pre = x @ mats[0].transpose(-1, -2)
        sig = torch.sigmoid(pre)
        hidden = pre * sig
        grad_pre = (grad_out @ mats[1]) * sig * (1 + pre * (1 - sig))
        return [(grad_pre, x), (grad_out, hidden)]


@dataclasses.dataclass(frozen=True)
class ResidualMLPMemory:
    """M_W(x) = x + LN(W2 σ(W1 x)), σ = GELU, LN without parameters; W1 `[E·D, D]`, W2 `[D, E·D]`.

    The Miras paper's memory (§5, "x + LN(W₁σ(W₂x))", its W₂ acting first): the residual makes the
    memory start near the identity, and the LayerNorm makes its output scale independent of the
    weights' scale, which the ℓ_q (Moneta) and KL/simplex (Memora) retention maps otherwise
    dictate. Needs `Dk == Dv`. `eps` is torch's LayerNorm default.
    """

    expansion: int = 4
    eps: float = 1e-5

    def shapes(self, d_k: int, d_v: int) -> list[tuple[int, int]]:
        if d_k != d_v:
            raise ValueError(f"ResidualMLPMemory needs d_k == d_v (it adds its input), got d_k={d_k}, d_v={d_v}")
        return [(self.expansion * d_k, d_k), (d_v, self.expansion * d_k)]

    def _norm(self, z):
        centred = z - z.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return centred / scale, scale

    def forward(self, mats: list[Tensor], x: Tensor) -> Tensor:
        return self.apply(dense_matvec(mats), x)

    def apply(self, matvec, x: Tensor) -> Tensor:
        return x + self._norm(matvec(1, F.gelu(matvec(0, x))))[0]

    def grad_factors(self, mats: list[Tensor], x: Tensor, grad_out: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Closed-form rank-one weight gradients, as `MLPMemory.grad_factors`."""
        pre = x @ mats[0].transpose(-1, -2)
        hidden = F.gelu(pre)
        normed, scale = self._norm(hidden @ mats[1].transpose(-1, -2))
        grad_z = (grad_out - grad_out.mean(-1, keepdim=True)
                  - normed * (grad_out * normed).mean(-1, keepdim=True)) / scale
        cdf = 0.5 * (1 + torch.erf(pre * 0.5 ** 0.5))
        pdf = torch.exp(-0.5 * pre * pre) * (2 * torch.pi) ** -0.5
        grad_pre = (grad_z @ mats[1]) * (cdf + pre * pdf)
        return [(grad_pre, x), (grad_z, hidden)]


def dense_matvec(mats: list[Tensor]):
    """The product W_i h for explicit weights: `mats[i]` `[..., r, c]`, h `[..., c]` (one matrix per row of h)."""
    return lambda i, h: (mats[i] @ h.unsqueeze(-1)).squeeze(-1)


def unflatten(flat: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """`[..., P]` -> one `[..., r, c]` tensor per memory matrix."""
    mats, start = [], 0
    for rows, cols in shapes:
        mats.append(flat[..., start:start + rows * cols].unflatten(-1, (rows, cols)))
        start += rows * cols
    return mats


def flatten(mats: list[Tensor]) -> Tensor:
    return torch.cat([m.flatten(-2) for m in mats], dim=-1)


# ----------------------------------------------------------------------------- attentional biases
# Each returns dℓ/d(prediction); the memory's `backward` turns it into weight gradients.

@dataclasses.dataclass(frozen=True)
class L2Bias:
    """ℓ = ‖M(k) − v‖²₂ (Titans, DeltaNet, Memora)."""

    def grad(self, pred: Tensor, target: Tensor, delta: Tensor | None = None) -> Tensor:
        return 2 * (pred - target)


@dataclasses.dataclass(frozen=True)
class LpBias:
    """ℓ = ‖M(k) − v‖_p^p (Moneta; p = 3 in the paper)."""

    p: float = 3.0

    def grad(self, pred: Tensor, target: Tensor, delta: Tensor | None = None) -> Tensor:
        err = pred - target
        return self.p * torch.sign(err) * err.abs() ** (self.p - 1)


@dataclasses.dataclass(frozen=True)
class HuberBias:
    """Yaad's Huber bias: the ℓ2 gradient while ‖M(k) − v‖₂ ≤ δ_t, else δ_t times the ℓ1 gradient."""

    def grad(self, pred: Tensor, target: Tensor, delta: Tensor | None = None) -> Tensor:
        err = pred - target
        small = err.norm(dim=-1, keepdim=True) <= delta.unsqueeze(-1)
        return torch.where(small, 2 * err, delta.unsqueeze(-1) * torch.sign(err))


# ----------------------------------------------------------------------------- retention gates
# A retention gate maps the accumulator A to the weights W = φ(A); the decay factor on A is the gate.

@dataclasses.dataclass(frozen=True)
class L2Retention:
    """W = A: weight decay towards 0 (Titans' forgetting, Yaad)."""

    def weights(self, accum: Tensor, shapes) -> Tensor:
        return accum

    def chunk_matvec(self, chunk, i: int, h: Tensor) -> Tensor:
        """W_t h_t for every token of a chunk (`accumulators.ChunkAccumulators`): W = A is linear, so
        the product never forms W_t."""
        return chunk.matvec(i, h)


@dataclasses.dataclass(frozen=True)
class LqRetention:
    """Moneta's ℓ_q retention: W = A / ‖A‖_q^(q−2), per memory matrix (q = 4 in the paper)."""

    q: float = 4.0

    def weights(self, accum: Tensor, shapes) -> Tensor:
        mats = unflatten(accum, shapes)
        out = [m / m.flatten(-2).norm(p=self.q, dim=-1)[..., None, None] ** (self.q - 2) for m in mats]
        return flatten(out)

    def chunk_matvec(self, chunk, i: int, h: Tensor) -> Tensor:
        # W_t = A_t / ‖A_t‖_q^(q−2), a scalar per matrix: only the norms need every token's A_t
        return chunk.matvec(i, h) / chunk.power_sums(i, self.q).unsqueeze(-1) ** ((self.q - 2) / self.q)


@dataclasses.dataclass(frozen=True)
class KLRetention:
    """Memora's KL retention: W = softmax(A) row-wise, i.e. W_t = softmax(α_t log W_{t−1} − η_t ∇ℓ).

    Row constants do not change a softmax, so A_t = α_t A_{t−1} − η_t ∇ℓ is exact."""

    def weights(self, accum: Tensor, shapes) -> Tensor:
        return flatten([torch.softmax(m, dim=-1) for m in unflatten(accum, shapes)])

    def chunk_matvec(self, chunk, i: int, h: Tensor) -> Tensor:
        # the row softmax is not linear in A_t: every token's matrix is formed
        return chunk.softmax_matvec(i, h)


# ----------------------------------------------------------------------------- learning rules

@dataclasses.dataclass(frozen=True)
class GradientDescent:
    """A_t = a_t A_{t−1} − θ_t g_t."""

    uses_momentum = False


@dataclasses.dataclass(frozen=True)
class MomentumDescent:
    """Titans' surprise with momentum: S_t = η_t S_{t−1} − θ_t g_t, A_t = a_t A_{t−1} + S_t."""

    uses_momentum = True
