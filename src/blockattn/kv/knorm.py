"""Key-norm eviction (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", EMNLP 2024; kvpress's KnormPress).

Rule: each KV head keeps the int(n·(1 − ratio)) tokens whose post-RoPE keys have the smallest L2 norm
(low-norm keys draw high attention); applied once after prefill.
"""
from __future__ import annotations

import dataclasses

from blockattn.kv import register
from blockattn.kv.base import ScorerPolicy


@register("knorm")
@dataclasses.dataclass
class KeyNorm(ScorerPolicy):
    def score(self, layer, query, key, value, scale):
        return -key.float().norm(dim=-1)
