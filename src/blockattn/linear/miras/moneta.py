"""Moneta: ℓ_p attentional bias with ℓ_q retention.

Paper: Behrouz et al., "It's All Connected: A Journey Through Test-Time Memorization, Attentional
Bias, Retention, and Online Optimization" (2025), §5. Rule: an MLP memory is trained online on
ℓ = ‖M(k_t) − v_t‖_p^p (p = 3) with A_t = α_t A_{t−1} − η_t ∇ℓ and weights W_t = A_t / ‖A_t‖_q^(q−2)
(q = 4), which keeps the memory's scale bounded without an explicit decay to zero.
"""
from __future__ import annotations

import dataclasses

from blockattn.linear.miras.common import MirasParts, run_memory
from blockattn.linear.miras.parts import GradientDescent, LpBias, LqRetention, MLPMemory


@dataclasses.dataclass(frozen=True)
class Moneta:
    p: float = 3.0
    q: float = 4.0
    expansion: int = 4

    @property
    def parts(self) -> MirasParts:
        return MirasParts(MLPMemory(self.expansion), LpBias(self.p), LqRetention(self.q), GradientDescent())


def moneta(q, k, v, *, lr=0.1, decay=0.99, p: float = 3.0, q_norm: float = 4.0, init=None, chunk_size: int = 16,
           causal: bool = True):
    """Causal Moneta memory read-out: q, k `[B, H, L, Dk]`, v `[B, H, L, Dv]` -> `[B, H, L, Dv]` (chunked form)."""
    return run_memory(q, k, v, Moneta(p, q_norm).parts, lr=lr, decay=decay, init=init, chunk_size=chunk_size,
                      causal=causal)
