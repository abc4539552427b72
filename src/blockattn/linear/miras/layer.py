"""`MemoryMixer`: any Miras memory as a causal token mixer `[B, L, d_model] -> [B, L, d_model]`.

Projections give q, k, v per head (q and k ℓ2-normalised, as in Titans, so the online
regression is well conditioned); per-token gates come from linear maps of x: the learning rate
θ_t = lr_max·sigmoid, the retention decay a_t = sigmoid (biased towards keeping), the momentum
η_t = sigmoid, Yaad's δ_t = softplus. The initial memory is a learned parameter per head.
Titans' §4.4 projections are an option: `silu=True` applies SiLU to q, k, v and `short_conv=K`
runs a causal depthwise convolution of width K after each projection (the paper's "1D
depthwise-separable convolution", here depthwise only: the projection is the pointwise part).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockattn.linear.miras.chunk import memory_chunk
from blockattn.linear.miras.common import MirasParts, default_init
from blockattn.linear.miras.parts import HuberBias, MomentumDescent


class MemoryMixer(nn.Module):
    def __init__(self, d_model: int, parts: MirasParts, *, heads: int = 1, chunk_size: int = 16, lr_max: float = 0.1,
                 silu: bool = False, short_conv: int = 0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        if isinstance(short_conv, bool) or not isinstance(short_conv, int) or short_conv < 0:
            raise ValueError(f"short_conv must be an int >= 0 (0: no convolution), got {short_conv!r}")
        self.parts, self.heads, self.chunk_size, self.lr_max = parts, heads, chunk_size, lr_max
        self.head_dim = d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.silu = bool(silu)
        self.conv = (nn.Conv1d(3 * d_model, 3 * d_model, short_conv, groups=3 * d_model, padding=short_conv - 1)
                     if short_conv else None)
        gates = 2 + isinstance(parts.rule, MomentumDescent) + isinstance(parts.bias, HuberBias)
        self.gates = nn.Linear(d_model, gates * heads)
        with torch.no_grad():
            self.gates.bias.view(gates, heads)[1].fill_(4.0)  # start with decay ≈ 0.98: remember
        self.init = nn.Parameter(default_init(parts, heads, self.head_dim, self.head_dim))
        self.out = nn.Linear(d_model, d_model, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v `[B, H, L, D]` of `x [B, L, d_model]`, q and k ℓ2-normalised."""
        batch, length, _ = x.shape
        qkv = self.qkv(x)
        if self.conv is not None:  # causal: keep the first L outputs of the left-padded convolution
            qkv = self.conv(qkv.transpose(1, 2))[..., :length].transpose(1, 2)
        if self.silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        pad = (-length) % self.chunk_size
        if pad:
            # The chunked form needs whole chunks; padding at the end cannot reach earlier tokens (causal).
            x = F.pad(x, (0, 0, 0, pad))
        total = length + pad
        q, k, v = self.project(x)
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
