"""`MemoryMixer`: any Miras memory as a causal token mixer `[B, L, d_model] -> [B, L, d_model]`.

Projections give q, k, v per head (q and k ℓ2-normalised, as in Titans, so the online
regression is well conditioned); per-token gates come from linear maps of x: the learning rate
θ_t = lr_max·sigmoid, the retention decay a_t = sigmoid (biased towards keeping), the momentum
η_t = sigmoid, Yaad's δ_t = softplus. The initial memory is a learned parameter per head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockattn.linear.miras.chunk import memory_chunk
from blockattn.linear.miras.common import MirasParts, default_init
from blockattn.linear.miras.parts import HuberBias, MomentumDescent


class MemoryMixer(nn.Module):
    def __init__(self, d_model: int, parts: MirasParts, *, heads: int = 1, chunk_size: int = 16, lr_max: float = 0.1):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.parts, self.heads, self.chunk_size, self.lr_max = parts, heads, chunk_size, lr_max
        self.head_dim = d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        gates = 2 + isinstance(parts.rule, MomentumDescent) + isinstance(parts.bias, HuberBias)
        self.gates = nn.Linear(d_model, gates * heads)
        with torch.no_grad():
            self.gates.bias.view(gates, heads)[1].fill_(4.0)  # start with decay ≈ 0.98: remember
        self.init = nn.Parameter(default_init(parts, heads, self.head_dim, self.head_dim))
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        pad = (-length) % self.chunk_size
        if pad:
            # The chunked form needs whole chunks; padding at the end cannot reach earlier tokens (causal).
            x = F.pad(x, (0, 0, 0, pad))
        total = length + pad
        q, k, v = self.qkv(x).view(batch, total, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = self.gates(x).view(batch, total, -1, self.heads).permute(2, 0, 3, 1)
        kwargs = dict(lr=self.lr_max * torch.sigmoid(gates[0]), decay=torch.sigmoid(gates[1]).clamp(min=1e-4))
        extra = 2
        if isinstance(self.parts.rule, MomentumDescent):
            kwargs["momentum"] = torch.sigmoid(gates[extra]).clamp(1e-4, 0.999)
            extra += 1
        if isinstance(self.parts.bias, HuberBias):
            kwargs["delta"] = F.softplus(gates[extra]) + 1e-3
        y = memory_chunk(q, k, v, parts=self.parts, init=self.init, chunk_size=self.chunk_size, **kwargs)
        y = y.transpose(1, 2).reshape(batch, total, d_model)[:, :length]
        return self.out(y)
