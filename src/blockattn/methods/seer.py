"""SeerAttention: block selection by a trained AttnGate per layer (Gao et al., arXiv 2410.13276).

Rule: each layer's gate (`blockattn.modules.seer_gate.SeerAttentionGate`, trained by
`blockattn train seer`) scores key blocks from block-pooled pre-RoPE q/k; a query-block row keeps its
top k = max(1, floor((1 - sqrt(1 - density)) nb)) blocks by gate logits (the official nz_ratio rule),
or the blocks whose softmaxed score exceeds `threshold`; by default the last two query-block rows are
dense (`last_block_dense`) and the diagonal block is not forced (both as the official code;
`force_diagonal=True` adds it). The
attention function sees post-RoPE q/k, so the gate's inputs are recovered by inverting plain RoPE
with the model's theta saved in the gate file (`model_rope_theta`; SmolLM2: 100000, no scaling). Prefill only (q_len = k_len).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from blockattn import _checks
from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn.methods.base import Method


@functools.lru_cache(maxsize=8)
def _load(path: str, model: str, block_size: int):
    from blockattn.modules.seer_gate import load_gates
    return load_gates(path, model=model, block_size=block_size)


@register("seer")
@dataclasses.dataclass
class SeerAttention(Method):
    """Args:
        gates: path of a gate file written by `blockattn train seer` (required).
        model: the model the gates were trained for; a file for another model is refused.
        density: target causal density in (0, 1] (top-k rule); exclusive with `threshold`.
        threshold: keep blocks with softmaxed gate score above it (official LongBench value 2e-3).
        block_size: the gates' block size (official: 64); a file for another is refused.
        last_block_dense: make the last two query-block rows dense (official default True).
        force_diagonal: also keep each row's diagonal block (not in the official rule; default False).
    """

    within_block_lookahead = True  # the gate scores block-pooled queries
    gates: str | None = None
    model: str = "smollm2-135m"
    density: float | None = None
    threshold: float | None = None
    block_size: int = 64
    last_block_dense: bool = True
    force_diagonal: bool = False

    causal_modes = (True,)
    required = ("gates",)
    any_lengths = False

    def __post_init__(self):
        from blockattn.modules.seer_gate import topk_for_density
        if not isinstance(self.gates, str) or not self.gates:
            raise ValueError("seer needs gates=PATH, a gate file written by `blockattn train seer`")
        self.check_positive_ints("block_size")
        if self.density is None and self.threshold is None:
            self.density = 0.25
        if self.density is not None and self.threshold is not None:
            raise ValueError("give density or threshold, not both")
        if self.density is not None:
            topk_for_density(self.density, 1)  # validates (0, 1]
        elif isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must lie in [0, 1), got {self.threshold!r}")
        _checks.bool_arg("last_block_dense", self.last_block_dense)
        _checks.bool_arg("force_diagonal", self.force_diagonal)
        _load(self.gates, self.model, self.block_size)  # a wrong file fails here, not mid-forward

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer: int | None) -> BlockLayout:
        from blockattn.modules.seer_gate import _rope_tables, invert_rope
        gates = _load(self.gates, self.model, self.block_size)
        if layer is None or layer not in gates:
            raise ValueError(f"seer has gates for layers {sorted(gates)}, not layer {layer!r}; patch only those "
                             f"layers (hf.patch(..., layers={{...}}))")
        gate = gates[layer].to(q.device)
        cos, sin = _rope_tables(q.shape[2], q.shape[3], gate.model_rope_theta, q.device)
        q_nope, k_nope = invert_rope(q.float(), cos, sin), invert_rope(k.float(), cos, sin)
        with torch.no_grad():
            return gate.select(q_nope, k_nope, density=self.density, threshold=self.threshold,
                               last_block_dense=self.last_block_dense, force_diagonal=self.force_diagonal)
