"""Titans' neural long-term memory, token by token: the definition the chunked form must equal.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), §3.
Rule: an MLP memory M is trained at test time on ℓ(M; x_t) = ‖M(k_t) − v_t‖²; the surprise
S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t'}; x_t) carries momentum, M_t = (1 − α_t) M_{t−1} + S_t forgets,
and y_t = M_t(q_t) reads the memory. t' is the start of t's chunk (the paper's parallel
training takes every gradient in a chunk at the chunk-start weights); chunk_size = 1 is the
fully sequential rule. In Miras terms: MLP memory, ℓ2 bias, ℓ2 retention, momentum descent.
The paper only asks for an MLP (L_M ≥ 1); `residual_norm=True` uses x + LN(W₂ GELU(W₁x))
(`ResidualMLPMemory`), the residual-and-norm memory of lucidrains' titans-pytorch default and of
the Miras paper (take `expansion=4` to match lucidrains).
"""
from __future__ import annotations

import dataclasses

from torch import Tensor

from blockattn.linear._checks import check_causal
from blockattn.linear.miras.common import MemoryState, MirasParts, default_init
from blockattn.linear.miras.naive import memory_naive
from blockattn.linear.miras.parts import L2Bias, L2Retention, MLPMemory, MomentumDescent, ResidualMLPMemory


@dataclasses.dataclass(frozen=True)
class Titans:
    """Paper defaults: a 2-layer MLP memory (L_M = 2) trained with momentum and forgetting."""

    expansion: int = 2
    residual_norm: bool = False

    @property
    def parts(self) -> MirasParts:
        memory = (ResidualMLPMemory if self.residual_norm else MLPMemory)(self.expansion)
        return MirasParts(memory, L2Bias(), L2Retention(), MomentumDescent())


def forget_to_decay(forget):
    """α_t in [0, 1) (float or tensor) -> the retention decay 1 − α_t, checked at the boundary."""
    if isinstance(forget, bool) or not isinstance(forget, (int, float, Tensor)):
        raise TypeError(f"forget must be a float or a tensor [B, H, L], got {type(forget).__name__}")
    if isinstance(forget, Tensor):
        if not bool(((forget >= 0) & (forget < 1)).all()):
            raise ValueError("forget must lie in [0, 1) (α_t = 1 would erase the memory)")
    elif not 0 <= forget < 1:
        raise ValueError(f"forget must lie in [0, 1) (α_t = 1 would erase the memory), got {forget}")
    return 1 - forget


def resolve_init(init, parts, q, v):
    if init is None and isinstance(q, Tensor) and isinstance(v, Tensor) and q.dim() == 4 and v.dim() == 4:
        return default_init(parts, q.shape[1], q.shape[3], v.shape[3], dtype=q.dtype, device=q.device)
    return init


def titans_naive(q: Tensor, k: Tensor, v: Tensor, *, lr=0.1, momentum=0.9, forget=0.01, chunk_size: int = 16,
                 expansion: int = 2, residual_norm: bool = False, init: Tensor | None = None,
                 initial_state: MemoryState | None = None, output_state: bool = False, causal: bool = True):
    """Token loop. q, k `[B, H, L, Dk]`, v `[B, H, L, Dv]`; gates θ (lr), η (momentum), α (forget) floats or `[B, H, L]`."""
    check_causal(causal)
    parts = Titans(expansion, residual_norm).parts
    return memory_naive(q, k, v, parts=parts, lr=lr, decay=forget_to_decay(forget), momentum=momentum,
                        init=resolve_init(init, parts, q, v) if initial_state is None else None,
                        chunk_size=chunk_size, initial_state=initial_state, output_state=output_state)


def titans_step(q: Tensor, k: Tensor, v: Tensor, state: MemoryState, *, lr=0.1, momentum=0.9, forget=0.01,
                chunk_size: int = 16, expansion: int = 2, residual_norm: bool = False) -> tuple[Tensor, MemoryState]:
    """One decode step continuing a prefill: q, k `[B, H, Dk]`, v `[B, H, Dv]`, gates floats or `[B, H]`.

    Returns `([B, H, Dv], new state)`."""
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be the MemoryState returned with output_state=True, got {type(state).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a tensor [B, H, D] for one decode step")
    lr, momentum, decay = (g.unsqueeze(-1) if isinstance(g, Tensor) else g for g in (lr, momentum, forget_to_decay(forget)))
    out, new_state = memory_naive(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2),
                                  parts=Titans(expansion, residual_norm).parts, lr=lr, decay=decay, momentum=momentum,
                                  chunk_size=chunk_size, initial_state=state, output_state=True)
    return out.squeeze(2), new_state


__all__ = ["Titans", "titans_naive", "titans_step"]
