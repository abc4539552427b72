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


@functools.lru_cache(maxsize=64)
def _cached(kind: str, q_len: int, k_len: int, causal: bool, block_q: int, block_k: int, device: str,
            **params) -> BlockLayout:
    if kind == "dense":
        layout = (patterns.causal if causal else patterns.full)(q_len, k_len, block_q=block_q, block_k=block_k)
    elif kind == "sliding_window":
        layout = patterns.sliding_window(q_len, k_len, causal=causal, block_q=block_q, block_k=block_k, **params)
    else:
        builder = streaming if kind == "streaming" else a_shape
        layout = builder(q_len, k_len, block_q=block_q, block_k=block_k, **params)
    return layout.to(device)


class _Static(Method):
    """A layout that depends only on the lengths (and the fields), cached per device."""

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        params = {f: getattr(self, f) for f in self.field_names() if f != "block_size"}
        return _cached(self.name, q.shape[2], k.shape[2], causal, self.block_size, self.block_size,
                       str(q.device), **params)


@register("dense")
@dataclasses.dataclass
class Dense(_Static):
    """Full (causal) attention through the block engine: the quality reference every method is measured against."""

    block_size: int = 64

    def __post_init__(self):
        self.check_positive_ints("block_size")


@register("sliding_window")
@dataclasses.dataclass
class SlidingWindow(_Static):
    """Longformer's local band: query i keeps keys i - window < j <= i (causal), or |i - j| <= window."""

    window: int = 512
    block_size: int = 64

    def __post_init__(self):
        self.check_positive_ints("block_size", "window")


@register("streaming")
@dataclasses.dataclass
class StreamingLLM(_Static):
    """StreamingLLM: keep the first `sink` tokens (attention sinks; the paper uses 4) and the `window`
    most recent keys of each query, causally, token exact."""

    causal_modes = (True,)

    sink: int = 4
    window: int = 512
    block_size: int = 64

    def __post_init__(self):
        self.check_positive_ints("block_size", "sink", "window")


@register("a_shape")
@dataclasses.dataclass
class AShape(StreamingLLM):
    """MInference's A-shape head pattern: whole key blocks covering the first `sink` tokens plus the blocks
    holding each query block's `window` most recent keys (block granular, causal inside tiles)."""

    sink: int = 64
    window: int = 1024
