"""What the token loop (`naive.py`) and the chunked form (`chunk.py`) share: the parts bundle, state, checks."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.linear._checks import check_causal, check_positive_int, check_qkv
from blockattn.linear.miras.parts import (GradientDescent, HuberBias, L2Bias, L2Retention, LinearMemory,
                                          LpBias, KLRetention, LqRetention, MLPMemory, MomentumDescent,
                                          ResidualMLPMemory)

_MEMORIES = (LinearMemory, MLPMemory, ResidualMLPMemory)
_BIASES = (L2Bias, LpBias, HuberBias)
_RETENTIONS = (L2Retention, LqRetention, KLRetention)
_RULES = (GradientDescent, MomentumDescent)


@dataclasses.dataclass(frozen=True)
class MirasParts:
    """The four Miras choices. Titans = (MLPMemory, L2Bias, L2Retention, MomentumDescent)."""

    memory: object = MLPMemory()
    bias: object = L2Bias()
    retention: object = L2Retention()
    rule: object = MomentumDescent()

    def __post_init__(self):
        for name, value, kinds in (("memory", self.memory, _MEMORIES), ("bias", self.bias, _BIASES),
                                   ("retention", self.retention, _RETENTIONS), ("rule", self.rule, _RULES)):
            if not isinstance(value, kinds):
                raise TypeError(f"{name} must be one of {[k.__name__ for k in kinds]}, got {type(value).__name__}")


@dataclasses.dataclass
class MemoryState:
    """Recurrent state after `position` tokens; `accum`, `momentum`, `ref_weights` are `[B·H, P]`.

    `ref_weights` are the weights at the start of the current chunk: the paper's parallel
    training takes every gradient inside a chunk at those weights."""

    accum: Tensor
    momentum: Tensor
    ref_weights: Tensor | None
    position: int


def param_count(parts: MirasParts, d_k: int, d_v: int) -> int:
    return sum(r * c for r, c in parts.memory.shapes(d_k, d_v))


def initial_state(parts: MirasParts, init: Tensor, batch: int, heads: int) -> MemoryState:
    accum = init.expand(batch, heads, init.shape[-1]).reshape(batch * heads, -1)
    # ref_weights is filled at the first chunk boundary, which position 0 is.
    return MemoryState(accum=accum, momentum=torch.zeros_like(accum), ref_weights=None, position=0)


def _gate(name: str, value, like: Tensor, low: float, high: float, low_open: bool, high_open: bool) -> Tensor:
    batch, heads, length = like.shape[:3]
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a tensor [B, H, L], got {type(value).__name__}")
    if not isinstance(value, Tensor):
        value = torch.full((batch, heads, length), float(value), dtype=like.dtype, device=like.device)
    if value.shape != (batch, heads, length):
        raise ValueError(f"{name} must have shape [B, H, L] = {[batch, heads, length]}, got {list(value.shape)}")
    if value.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype}, got {value.dtype}")
    lo_ok = (value > low) if low_open else (value >= low)
    hi_ok = (value < high) if high_open else (value <= high)
    if not bool((lo_ok & hi_ok).all()):
        raise ValueError(f"{name} must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
    return value


def check_inputs(q, k, v, parts, init, lr, decay, momentum, delta, chunk_size, state):
    """Validate at the boundary; returns the gates as `[B, H, L]` tensors (momentum/delta may be None)."""
    check_qkv(q, k, v)
    if not isinstance(parts, MirasParts):
        raise TypeError(f"parts must be a MirasParts, got {type(parts).__name__}")
    check_positive_int("chunk_size", chunk_size)
    batch, heads, _, d_k = q.shape
    expected = param_count(parts, d_k, v.shape[3])
    if state is None:
        if not isinstance(init, Tensor):
            raise TypeError(f"init must be a tensor [H, P] or [B, H, P] of initial memory weights, got {type(init).__name__}")
        if init.shape not in ((heads, expected), (batch, heads, expected)):
            raise ValueError(f"init must have shape [H, P] = {[heads, expected]} (or [B, H, P]) for "
                             f"{type(parts.memory).__name__} with d_k={d_k}, d_v={v.shape[3]}; got {list(init.shape)}")
        if init.dtype != q.dtype:
            raise TypeError(f"init must have dtype {q.dtype}, got {init.dtype}")
    elif not isinstance(state, MemoryState) or state.accum.shape != (batch * heads, expected):
        raise ValueError(f"initial_state must be the MemoryState of a run with the same B·H and memory shape "
                         f"[{batch * heads}, {expected}]")
    lr = _gate("lr", lr, q, 0.0, float("inf"), False, True)
    decay = _gate("decay", decay, q, 0.0, 1.0, True, False)
    if isinstance(parts.rule, MomentumDescent):
        if momentum is None:
            raise ValueError("momentum must be given (in (0, 1)) for the MomentumDescent learning rule")
        momentum = _gate("momentum", momentum, q, 0.0, 1.0, True, True)
    elif momentum is not None:
        raise ValueError("momentum must be None for the GradientDescent learning rule")
    if isinstance(parts.bias, HuberBias):
        if delta is None:
            raise ValueError("delta (the Huber threshold δ_t > 0) must be given for HuberBias")
        delta = _gate("delta", delta, q, 0.0, float("inf"), True, True)
    elif delta is not None:
        raise ValueError("delta is only used by HuberBias; pass None")
    return lr, decay, momentum, delta



def default_init(parts: MirasParts, heads: int, d_k: int, d_v: int, *, dtype=torch.float32, device=None,
                 seed: int = 0) -> Tensor:
    """Initial memory `[H, P]`: fan-in scaled normal weights from a seeded generator (reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    mats = [torch.randn(heads, r, c, generator=generator, dtype=torch.float64) / c ** 0.5
            for r, c in parts.memory.shapes(d_k, d_v)]
    return torch.cat([m.flatten(-2) for m in mats], dim=-1).to(dtype=dtype, device=device)


def run_memory(q, k, v, parts, *, lr, decay, momentum=None, delta=None, init=None, chunk_size=16, causal=True):
    """The public functional form: the chunked path, the default initial memory when `init` is None.

    A test-time memory only ever learns from the past, so `causal` must be True."""
    check_causal(causal)
    from blockattn.linear.miras.chunk import memory_chunk
    if init is None and isinstance(q, Tensor) and isinstance(v, Tensor) and q.dim() == 4 and v.dim() == 4:
        init = default_init(parts, q.shape[1], q.shape[3], v.shape[3], dtype=q.dtype, device=q.device)
    return memory_chunk(q, k, v, parts=parts, lr=lr, decay=decay, momentum=momentum, delta=delta, init=init,
                        chunk_size=chunk_size)
