"""The bounded-entry approximation of tensor attention (Alman & Song, ICLR 2024), near-linear in n.

Rule: when every entry of q, k1, k2 is at most B in magnitude, each score x = ⟨q, k1 ⊙ k2⟩/d lies
in [−β, β] with β = B³ (with the paper's 1/d scale), and exp on that interval is replaced by
its degree-g Taylor polynomial. Since (k1 ⊙ k2)^{⊗m} = k1^{⊗m} ⊙ k2^{⊗m}, the polynomial
attention matrix factors as U1 (W1 ⊘ W2)ᵀ with rank r = Σ_{m≤g} d^m, and the n² key pairs are
never formed: out_i = U1_i (W1ᵀV1 ⊙ W2ᵀV2) / U1_i (W1ᵀ1 ⊙ W2ᵀ1) — O(n·r·d) (prefix sums when causal).

Error: the Lagrange remainder gives an entry-wise relative error ε = e^{2β} β^{g+1}/(g+1)!, and
normalising such a matrix moves each output by at most 2ε/(1−ε)·‖V1‖∞‖V2‖∞ (`error_bound`).
The paper's statement is the same mechanism: polynomial degree g = O(log(1/ε)/log(log(1/ε)/β))
suffices while β = o(log n) — i.e. entries B = o(∛log n).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from blockattn.linear.kronecker.naive import check_tensor_attention


def entry_bound(q: Tensor, k1: Tensor, k2: Tensor, scale: float) -> float:
    """β with |scale·⟨q_i, k1_j ⊙ k2_k⟩| ≤ β for every triple: scale·d·max|q|·max|k1|·max|k2|."""
    return scale * q.shape[-1] * float(q.abs().max() * k1.abs().max() * k2.abs().max())


def error_bound(beta: float, degree: int, value_bound: float = 1.0) -> float:
    """Max-norm bound on the output error of the degree-`degree` approximation; inf when ε ≥ 1."""
    if beta == 0:
        return 0.0
    # log space: e^{2β} overflows a float long before the bound stops being vacuous
    log_eps = 2 * beta + (degree + 1) * math.log(beta) - math.lgamma(degree + 2)
    if log_eps >= 0:
        return math.inf
    eps = math.exp(log_eps)
    return 2 * eps / (1 - eps) * value_bound


def degree_for(beta: float, eps: float, max_degree: int = 12) -> int:
    """The smallest Taylor degree whose output bound (unit values) is at most `eps`."""
    for degree in range(max_degree + 1):
        if error_bound(beta, degree) <= eps:
            return degree
    raise ValueError(f"no degree <= {max_degree} reaches eps={eps} for entry bound β={beta:.3g}: "
                     f"entries are too large for the bounded-entry approximation")


def _tensor_powers(x: Tensor, degree: int, coefficients: list[float] | None = None) -> Tensor:
    """`[..., d]` -> `[..., Σ_{m≤g} d^m]`: the flattened powers x^{⊗m}, each times its coefficient."""
    feats, power = [], torch.ones_like(x[..., :1])
    for m in range(degree + 1):
        feats.append(power * (1.0 if coefficients is None else coefficients[m]))
        power = (power.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat(feats, dim=-1)


def tensor_attention_approx(q: Tensor, k1: Tensor, v1: Tensor, *, k2: Tensor | None = None, v2: Tensor | None = None,
                            degree: int | None = None, eps: float = 1e-3, scale: float | None = None,
                            causal: bool = True) -> Tensor:
    """Polynomial (bounded-entry) tensor attention. Shapes as `tensor_attention` (k2, v2 default to k1, v1).

    Args:
        degree: Taylor degree g; default the smallest whose `error_bound` for the inputs' β is ≤ `eps`.
        eps: target output error (for unit-bounded values) when `degree` is None.

    Returns:
        `[B, H, n, dv]`.
    """
    k2 = k1 if k2 is None else k2
    v2 = v1 if v2 is None else v2
    scale = check_tensor_attention(q, k1, k2, v1, v2, scale, causal)
    if degree is None:
        degree = degree_for(entry_bound(q, k1, k2, scale), eps)
    elif isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be a non-negative int or None, got {degree!r}")
    rank = sum(q.shape[-1] ** m for m in range(degree + 1))
    if rank > 1 << 16:
        raise ValueError(f"degree {degree} with d={q.shape[-1]} gives rank {rank} > 65536 features; lower the degree")
    coefficients = [scale ** m / math.factorial(m) for m in range(degree + 1)]
    u = _tensor_powers(q, degree, coefficients)
    w1, w2 = _tensor_powers(k1, degree), _tensor_powers(k2, degree)
    ones = torch.ones_like(v1[..., :1])
    v1a, v2a = torch.cat([v1, ones], dim=-1), torch.cat([v2, ones], dim=-1)
    if causal:
        x1 = torch.cumsum(w1.unsqueeze(-1) * v1a.unsqueeze(-2), dim=2)  # [B, H, n, r, dv+1]
        x2 = torch.cumsum(w2.unsqueeze(-1) * v2a.unsqueeze(-2), dim=2)
        mixed = torch.einsum("bhir,bhird->bhid", u, x1 * x2)
    else:
        x1 = w1.transpose(-1, -2) @ v1a
        x2 = w2.transpose(-1, -2) @ v2a
        mixed = u @ (x1 * x2)
    return mixed[..., :-1] / mixed[..., -1:]
