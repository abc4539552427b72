"""Moneta: ℓ_p attentional bias with ℓ_q retention.

Paper: Behrouz et al., "It's All Connected: A Journey Through Test-Time Memorization, Attentional
Bias, Retention, and Online Optimization" (2025), §5. Rule: an MLP memory is trained online on
ℓ = ‖M(k_t) − v_t‖_p^p (p = 3) with A_t = α_t A_{t−1} − η_t ∇ℓ and weights W_t = A_t / ‖A_t‖_q^(q−2)
(q = 4), which keeps the memory's scale bounded without an explicit decay to zero. The memory is
the paper's M(x) = x + LN(W₁σ(W₂x)) (`ResidualMLPMemory`); `residual_norm=False` gives the bare
W₂σ(W₁x), whose output scale the ℓ_q map ties to 1/‖A‖_q (it cannot store unit-scale values).
"""
from __future__ import annotations

import dataclasses

from blockattn.linear.miras.common import MirasParts, run_memory
from blockattn.linear.miras.parts import GradientDescent, LpBias, LqRetention, MLPMemory, ResidualMLPMemory


@dataclasses.dataclass(frozen=True)
class Moneta:
    p: float = 3.0
    q: float = 4.0
    expansion: int = 4
    residual_norm: bool = True

    @property
    def parts(self) -> MirasParts:
        memory = (ResidualMLPMemory if self.residual_norm else MLPMemory)(self.expansion)
        return MirasParts(memory, LpBias(self.p), LqRetention(self.q), GradientDescent())


def moneta(q, k, v, *, lr=0.1, decay=0.99, p: float = 3.0, q_norm: float = 4.0, residual_norm: bool = True, init=None,
           chunk_size: int = 16, causal: bool = True):
    """Causal Moneta memory read-out: q, k `[B, H, L, D]`, v `[B, H, L, D]` -> `[B, H, L, D]` (chunked form;
    `Dk == Dv` with the residual memory)."""
    return run_memory(q, k, v, Moneta(p, q_norm, residual_norm=residual_norm).parts, lr=lr, decay=decay, init=init,
                      chunk_size=chunk_size, causal=causal)
