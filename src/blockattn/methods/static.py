"""Static baselines registered as methods, so every harness can compare dynamic selection with them.

`dense` (all causal tiles, or all tiles for encoders), `sliding_window` (Beltagy et al., "Longformer",
2020: each query sees the `window` most recent keys), `streaming` (Xiao et al., "Efficient Streaming
Language Models with Attention Sinks", ICLR 2024: `sink` first tokens + `window` recent ones, token
exact) and `a_shape` (Jiang et al., "MInference 1.0", NeurIPS 2024: the same shape in whole blocks).
They ignore the values of q and k; their layouts depend only on the lengths and are cached.
"""
from __future__ import annotations

import dataclasses
import functools

from torch import Tensor

from blockattn import patterns
from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn.methods.base import Method
from blockattn.patterns.sinks import a_shape, streaming


def _lengths(q: Tensor, k: Tensor) -> tuple[int, int]:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor [B, H, L, D], got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    return q.shape[2], k.shape[2]


@functools.lru_cache(maxsize=64)
def _cached(kind: str, q_len: int, k_len: int, causal: bool, block_q: int, block_k: int, **params) -> BlockLayout:
    if kind == "dense":
        return (patterns.causal if causal else patterns.full)(q_len, k_len, block_q=block_q, block_k=block_k)
    if kind == "sliding_window":
        return patterns.sliding_window(q_len, k_len, causal=causal, block_q=block_q, block_k=block_k, **params)
    if not causal:
        raise ValueError(f"{kind} is a causal pattern; it cannot serve a bidirectional (encoder) model")
    builder = streaming if kind == "streaming" else a_shape
    return builder(q_len, k_len, block_q=block_q, block_k=block_k, **params)


def _check_block(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


@register("dense")
@dataclasses.dataclass
class Dense(Method):
    """Full (causal) attention through the block engine: the quality reference every method is measured against."""

    block_size: int = 64

    def __post_init__(self):
        _check_block(self.block_size)

    def select(self, q: Tensor, k: Tensor, *, causal: bool = True, **ctx) -> BlockLayout:
        q_len, k_len = _lengths(q, k)
        return _cached("dense", q_len, k_len, bool(causal), self.block_size, self.block_size)


@register("sliding_window")
@dataclasses.dataclass
class SlidingWindow(Method):
    """Longformer's local band: query i keeps keys i - window < j <= i (causal), or |i - j| <= window."""

    window: int = 512
    block_size: int = 64

    def __post_init__(self):
        _check_block(self.block_size)
        self.check_positive_ints("window")

    def select(self, q: Tensor, k: Tensor, *, causal: bool = True, **ctx) -> BlockLayout:
        q_len, k_len = _lengths(q, k)
        return _cached("sliding_window", q_len, k_len, bool(causal), self.block_size, self.block_size,
                       window=self.window)


@register("streaming")
@dataclasses.dataclass
class StreamingLLM(Method):
    """StreamingLLM: keep the first `sink` tokens (attention sinks; the paper uses 4) and the `window`
    most recent keys of each query, causally, token exact."""

    sink: int = 4
    window: int = 512
    block_size: int = 64

    def __post_init__(self):
        _check_block(self.block_size)
        self.check_positive_ints("sink", "window")

    def select(self, q: Tensor, k: Tensor, *, causal: bool = True, **ctx) -> BlockLayout:
        q_len, k_len = _lengths(q, k)
        return _cached("streaming", q_len, k_len, bool(causal), self.block_size, self.block_size,
                       sink=self.sink, window=self.window)


@register("a_shape")
@dataclasses.dataclass
class AShape(StreamingLLM):
    """MInference's A-shape head pattern: whole key blocks covering the first `sink` tokens plus the blocks
    holding each query block's `window` most recent keys (block granular, causal inside tiles)."""

    sink: int = 64
    window: int = 1024

    def select(self, q: Tensor, k: Tensor, *, causal: bool = True, **ctx) -> BlockLayout:
        q_len, k_len = _lengths(q, k)
        return _cached("a_shape", q_len, k_len, bool(causal), self.block_size, self.block_size,
                       sink=self.sink, window=self.window)
