"""Yaad: Huber attentional bias with Titans-style retention.

Paper: Behrouz et al., "It's All Connected" (2025), §5. Rule: the memory follows the ℓ2 gradient
of ‖M(k_t) − v_t‖² while the error norm is at most a data-dependent δ_t and δ_t times the ℓ1
gradient beyond it (robust to outlier tokens); W_t = α_t W_{t−1} − η_t ∇ℓ. The memory is the
paper's M(x) = x + LN(W₁σ(W₂x)) (`ResidualMLPMemory`); `residual_norm=False` gives the bare MLP.
"""
from __future__ import annotations

import dataclasses

from blockattn.linear.miras.common import MirasParts, run_memory
from blockattn.linear.miras.parts import GradientDescent, HuberBias, L2Retention, MLPMemory, ResidualMLPMemory


@dataclasses.dataclass(frozen=True)
class Yaad:
    expansion: int = 4
    residual_norm: bool = True

    @property
    def parts(self) -> MirasParts:
        memory = (ResidualMLPMemory if self.residual_norm else MLPMemory)(self.expansion)
        return MirasParts(memory, HuberBias(), L2Retention(), GradientDescent())


def yaad(q, k, v, *, lr=0.1, decay=0.99, delta=1.0, residual_norm: bool = True, init=None, chunk_size: int = 16,
         causal: bool = True):
    """Causal Yaad memory read-out: q, k, v `[B, H, L, D]` -> `[B, H, L, D]` (chunked form; `Dk == Dv` with the
    residual memory)."""
    return run_memory(q, k, v, Yaad(residual_norm=residual_norm).parts, lr=lr, decay=decay, delta=delta, init=init,
                      chunk_size=chunk_size, causal=causal)
