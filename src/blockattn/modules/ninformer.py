"""NiNformer block: a token-mixing network generates the gate that replaces self-attention.

Abdullah & Aydin, "NiNformer: A Network in Network Transformer with Token Mixing Generated
Gating Function" (arXiv 2403.02411); official code Abdullah-88/NiNformer (`NiNBlock`). Tokens
`[B, N, D]`, N fixed at construction (the token MLP is N -> d_ffn -> N):

    Xn  = LN(X)
    MGU = Linear_D(Xn) * Mixer(Xn),  Mixer(y) = y1 + ChannelMLP(LN_b(y1)),  y1 = y + TokenMLP(LN_a(y))
    X'  = X + MGU;   out = X' + FFN(LN(X'))

As in the official block, one LayerNorm serves both outer pre-norms (shared affine parameters).
MLPs are Linear -> GELU -> Dropout -> Linear -> Dropout with hidden width `d_ffn` everywhere.
The block has no softmax anywhere (the gate is the element-wise product), so it runs in plain
PyTorch. Paper defaults (CIFAR-10): patch 4 on 32x32 (N = 64), D = 256, d_ffn = 512, 4 blocks,
dropout 0.5; `NiNBlock(256, 512, 64)` has 659,264 parameters.
"""
from __future__ import annotations

from torch import Tensor, nn

from blockattn.modules._block_checks import check_positive_int, check_same_device_dtype, check_tensor

__all__ = ["NiNBlock"]


def _mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class NiNBlock(nn.Module):
    """One NiNformer block over `[B, num_tokens, dim]`."""

    def __init__(self, dim: int, d_ffn: int, num_tokens: int, *, dropout: float = 0.0):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_tokens = check_positive_int("num_tokens", num_tokens)
        check_positive_int("d_ffn", d_ffn)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, dim)
        self.token_norm, self.token_mlp = nn.LayerNorm(dim), _mlp(num_tokens, d_ffn, dropout)
        self.channel_norm, self.channel_mlp = nn.LayerNorm(dim), _mlp(dim, d_ffn, dropout)
        self.ffn = _mlp(dim, d_ffn, dropout)

    def mixer(self, y: Tensor) -> Tensor:
        y = y + self.token_mlp(self.token_norm(y).transpose(1, 2)).transpose(1, 2)
        return y + self.channel_mlp(self.channel_norm(y))

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, 3, f"[B, N={self.num_tokens}, D={self.dim}]", d1=self.num_tokens, d2=self.dim)
        check_same_device_dtype(self, "x", x)
        xn = self.norm(x)
        x = x + self.gate_proj(xn) * self.mixer(xn)
        return x + self.ffn(self.norm(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_tokens={self.num_tokens}"
