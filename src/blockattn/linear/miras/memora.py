"""Memora: ℓ2 attentional bias with KL-divergence retention (memory rows on the simplex).

Paper: Behrouz et al., "It's All Connected" (2025), §5. Rule: W_t = softmax(α_t log W_{t−1} −
η_t ∇ℓ2(W_{t−1}; k_t, v_t)) row-wise: a mirror-descent step whose KL retention keeps every row
of every memory matrix a probability vector, so the memory cannot blow up. The memory is the
paper's M(x) = x + LN(W₁σ(W₂x)) (`ResidualMLPMemory`): the LayerNorm restores the output scale the
simplex rows remove; `residual_norm=False` gives the bare W₂σ(W₁x), whose outputs stay within
the convex hull of its inputs (it cannot store unit-scale values).
"""
from __future__ import annotations

import dataclasses

from blockattn.linear.miras.common import MirasParts, run_memory
from blockattn.linear.miras.parts import GradientDescent, KLRetention, L2Bias, MLPMemory, ResidualMLPMemory


@dataclasses.dataclass(frozen=True)
class Memora:
    expansion: int = 4
    residual_norm: bool = True

    @property
    def parts(self) -> MirasParts:
        memory = (ResidualMLPMemory if self.residual_norm else MLPMemory)(self.expansion)
        return MirasParts(memory, L2Bias(), KLRetention(), GradientDescent())


def memora(q, k, v, *, lr=0.1, decay=0.99, residual_norm: bool = True, init=None, chunk_size: int = 16,
           causal: bool = True):
    """Causal Memora memory read-out: q, k, v `[B, H, L, D]` -> `[B, H, L, D]` (chunked form; `Dk == Dv` with
    the residual memory)."""
    return run_memory(q, k, v, Memora(residual_norm=residual_norm).parts, lr=lr, decay=decay, init=init,
                      chunk_size=chunk_size, causal=causal)
