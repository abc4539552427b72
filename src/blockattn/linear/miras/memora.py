"""Memora: ℓ2 attentional bias with KL-divergence retention (memory rows on the simplex).

Paper: Behrouz et al., "It's All Connected" (2025), §5. Rule: W_t = softmax(α_t log W_{t−1} −
η_t ∇ℓ2(W_{t−1}; k_t, v_t)) row-wise: a mirror-descent step whose KL retention keeps every row
of every memory matrix a probability vector, so the memory cannot blow up.
"""
from __future__ import annotations

import dataclasses

from blockattn.linear.miras.common import MirasParts, run_memory
from blockattn.linear.miras.parts import GradientDescent, KLRetention, L2Bias, MLPMemory


@dataclasses.dataclass(frozen=True)
class Memora:
    expansion: int = 4

    @property
    def parts(self) -> MirasParts:
        return MirasParts(MLPMemory(self.expansion), L2Bias(), KLRetention(), GradientDescent())


def memora(q, k, v, *, lr=0.1, decay=0.99, init=None, chunk_size: int = 16, causal: bool = True):
    """Causal Memora memory read-out: q, k `[B, H, L, Dk]`, v `[B, H, L, Dv]` -> `[B, H, L, Dv]` (chunked form)."""
    return run_memory(q, k, v, Memora().parts, lr=lr, decay=decay, init=init, chunk_size=chunk_size, causal=causal)
