"""OAT: object-level attention for gaze scanpath prediction, with its learned spatial positional table.

Fang, Yu, Zhang, van der Lans, Shi, "OAT: Object-Level Attention Transformer for Gaze Scanpath
Prediction" (ECCV 2024, arXiv 2407.13335); official code HKUST-NISL/oat_eccv24
(`src/model/models.py`, `src/model/positionalEncodingLearned.py`).

- Learned positional table (`fit_positional_table`): a table W `[R, D]` (R = 14, D = 86 in the
  official script) is fitted offline so that `cos(W_i, W_j) ~ exp(-(i - j)^2 / (2 sigma^2))`
  (sigma = 2): loss = sum over all pairs of the squared cosine error plus the variance of the row
  norms, divided by R(R - 1); Adam, lr 0.01, 10k iterations; pass criterion |cos - target| <= 1e-3.
  An object at grid coordinates (a, b, c) gets `concat(W_a, W_b, W_c)` truncated to E/2, so nearby
  objects get similar codes.
- Tokens: object token = [appearance embedding (E/2); positional code (E/2)]; the search target
  is one more encoder token (its appearance, zero code). The decoder reads the fixation history
  (object tokens plus the 1-D sinusoidal order encoding).
- Transformer: post-norm encoder/decoder layers (as `nn.Transformer`, ReLU FFN, dropout 0.1);
  every attention runs through the block engine: full layout in the encoder and the cross
  attention, causal layout in the decoder's self-attention.
- Output head (`CAVersion 3`, CA_head = 2, CA_dk = 512): each scorer gives
  `<W_e enc_j, W_d dec_i> / sqrt(d_k)` over objects plus a fixed 0 logit for "stop" (index N);
  `Linear(CA_head -> 1)` merges the scorers into the logits `[B, T, N + 1]`. Like a pointer
  network, the scores are the output, not weights that blend values.
Choices that are ours: appearance features come in as vectors (the paper's CNN over object
crops is left to the caller), a learned start token opens the decoder, and E / heads / layers
have no paper default here (the constructor asks for them).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blockattn
from blockattn.modules._block_checks import check_positive_int, check_same_device_dtype, check_tensor
from blockattn.patterns import causal, full

__all__ = ["fit_positional_table", "positional_table_error", "ObjectPositionalEncoding", "ObjectCrossAttention",
           "ObjectAttentionTransformer"]


def _gaussian_target(rows: int, sigma: float, device=None) -> Tensor:
    i = torch.arange(rows, dtype=torch.float32, device=device)
    return torch.exp(-(i[:, None] - i[None]) ** 2 / (2 * sigma ** 2))


def positional_table_error(table: Tensor, sigma: float = 2.0) -> float:
    """max |cos(W_i, W_j) - exp(-(i-j)^2 / 2 sigma^2)| over all pairs."""
    w = F.normalize(table.float(), dim=1)
    return (w @ w.T - _gaussian_target(table.shape[0], sigma, table.device)).abs().max().item()


def fit_positional_table(rows: int = 14, dim: int = 86, *, sigma: float = 2.0, iterations: int = 10_000,
                         lr: float = 0.01, seed: int = 0) -> Tensor:
    """Fit OAT's table `[rows, dim]` (official objective and optimiser; see the module docstring)."""
    check_positive_int("rows", rows)
    check_positive_int("dim", dim)
    check_positive_int("iterations", iterations)
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or sigma <= 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    generator = torch.Generator().manual_seed(seed)
    table = nn.Parameter(torch.randn(rows, dim, generator=generator))
    target = _gaussian_target(rows, sigma)
    opt = torch.optim.Adam([table], lr=lr)
    for _ in range(iterations):
        w = F.normalize(table, dim=1)
        norms = table.norm(dim=1)
        loss = (((w @ w.T - target) ** 2).sum() + ((norms - norms.mean()) ** 2).mean()) / (rows * (rows - 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return table.detach()


class ObjectPositionalEncoding(nn.Module):
    """Grid coordinates `[B, N, axes]` (long) -> `concat(W[c_1], ..., W[c_axes])[..., :out_dim]`."""

    def __init__(self, table: Tensor, out_dim: int):
        super().__init__()
        check_tensor("table", table, 2, "[R, D]")
        self.out_dim = check_positive_int("out_dim", out_dim)
        self.register_buffer("table", table.detach().clone())

    def forward(self, coords: Tensor) -> Tensor:
        if not isinstance(coords, Tensor) or coords.dtype != torch.long or coords.dim() != 3:
            raise TypeError("coords must be a long tensor [B, N, axes]")
        if coords.numel() and (coords.min() < 0 or coords.max() >= self.table.shape[0]):
            raise ValueError(f"coords must lie in [0, {self.table.shape[0]}) (the table's rows)")
        if coords.shape[2] * self.table.shape[1] < self.out_dim:
            raise ValueError(f"{coords.shape[2]} coordinates x {self.table.shape[1]} columns cannot fill out_dim "
                             f"{self.out_dim}")
        return self.table[coords].flatten(2)[..., :self.out_dim]


class ObjectCrossAttention(nn.Module):
    """One OAT scorer: `[B, T, N + 1]` logits `<W_e enc_j, W_d dec_i> / sqrt(d_k)` with a 0 stop logit."""

    def __init__(self, dim: int, d_k: int = 512):
        super().__init__()
        check_positive_int("dim", dim)
        self.d_k = check_positive_int("d_k", d_k)
        self.encode_fc, self.decode_fc = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, encoder: Tensor, decoder: Tensor) -> Tensor:
        scores = self.decode_fc(decoder) @ self.encode_fc(encoder).transpose(1, 2)
        return F.pad(scores, (0, 1)) / self.d_k ** 0.5


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor, is_causal: bool) -> Tensor:
        b, t, dim = x.shape
        n, d = memory.shape[1], dim // self.heads
        q = self.q(x).view(b, t, self.heads, d).transpose(1, 2)
        k, v = self.kv(memory).view(b, n, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        layout = causal(t, n) if is_causal else full(t, n)
        return self.proj(blockattn.attention(q, k, v, layout, backend=self.backend).transpose(1, 2).reshape(b, t, dim))


class _Layer(nn.Module):
    """Post-norm transformer layer; with `cross=True` a decoder layer (causal self-attention + cross)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, cross: bool, backend: str):
        super().__init__()
        self.self_attn = _Attention(dim, heads, backend)
        self.cross_attn = _Attention(dim, heads, backend) if cross else None
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3 if cross else 2))
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        x = self.norms[0](x + self.drop(self.self_attn(x, x, is_causal=self.cross_attn is not None)))
        if self.cross_attn is not None:
            x = self.norms[1](x + self.drop(self.cross_attn(x, memory, is_causal=False)))
        return self.norms[-1](x + self.drop(self.ffn(x)))


def _sinusoid(length: int, dim: int, device, dtype) -> Tensor:
    den = torch.exp(-torch.arange(0, dim, 2, device=device, dtype=torch.float32) * math.log(10000) / dim)
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * den), torch.cos(pos * den)[:, :dim // 2]
    return pe.to(dtype)


class ObjectAttentionTransformer(nn.Module):
    """OAT over a scene of N objects.

    `forward(appearance [B, N, A], coords [B, N, axes] long, target [B, A], history [B, T] long)`
    returns logits `[B, T + 1, N + 1]`: row t is the next fixation after the start token and
    `history[:, :t]` (index N = stop). Without `table` the objects get no positional code (zeros),
    the ablation the paper compares against.
    """

    def __init__(self, appearance_dim: int, dim: int, heads: int, *, table: Tensor | None = None,
                 num_encoder_layers: int = 2, num_decoder_layers: int = 2, dim_feedforward: int | None = None,
                 ca_heads: int = 2, ca_dk: int = 512, dropout: float = 0.1, backend: str = "auto"):
        super().__init__()
        check_positive_int("appearance_dim", appearance_dim)
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        if dim % 2 or dim % heads:
            raise ValueError(f"dim must be even and divisible by heads={heads}, got {dim}")
        self.appearance_dim, self.dim = appearance_dim, dim
        self.appearance = nn.Linear(appearance_dim, dim // 2)
        self.position = None if table is None else ObjectPositionalEncoding(table, dim // 2)
        self.start = nn.Parameter(torch.zeros(dim).normal_(0, 0.02))
        ffn = dim_feedforward or 4 * dim
        self.encoder = nn.ModuleList(_Layer(dim, heads, ffn, dropout, False, backend)
                                     for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(_Layer(dim, heads, ffn, dropout, True, backend)
                                     for _ in range(num_decoder_layers))
        self.scorers = nn.ModuleList(ObjectCrossAttention(dim, ca_dk) for _ in range(check_positive_int("ca_heads",
                                                                                                          ca_heads)))
        self.readout = nn.Linear(ca_heads, 1)

    def object_tokens(self, appearance: Tensor, coords: Tensor) -> Tensor:
        look = self.appearance(appearance)
        code = self.position(coords).to(look.dtype) if self.position is not None else torch.zeros_like(look)
        return torch.cat([look, code], dim=-1)

    def forward(self, appearance: Tensor, coords: Tensor, target: Tensor, history: Tensor) -> Tensor:
        check_tensor("appearance", appearance, 3, f"[B, N, A={self.appearance_dim}]", d2=self.appearance_dim)
        check_same_device_dtype(self, "appearance", appearance)
        b, n, _ = appearance.shape
        check_tensor("target", target, 2, f"[B={b}, A={self.appearance_dim}]", d0=b, d1=self.appearance_dim)
        if not isinstance(coords, Tensor) or coords.dtype != torch.long or coords.shape[:2] != (b, n):
            raise TypeError(f"coords must be a long tensor [B={b}, N={n}, axes]")
        if not isinstance(history, Tensor) or history.dtype != torch.long or history.dim() != 2 or \
                history.shape[0] != b:
            raise TypeError(f"history must be a long tensor [B={b}, T] of object indices")
        if history.numel() and (history.min() < 0 or history.max() >= n):
            raise ValueError(f"history must index the {n} objects")
        objects = self.object_tokens(appearance, coords)
        target_token = torch.cat([self.appearance(target), torch.zeros_like(self.appearance(target))], -1)
        memory = torch.cat([objects, target_token[:, None]], dim=1)
        for layer in self.encoder:
            memory = layer(memory)
        steps = torch.cat([self.start.expand(b, 1, -1), objects.gather(1, history[..., None].expand(-1, -1,
                                                                                                   self.dim))], 1)
        x = steps + _sinusoid(steps.shape[1], self.dim, steps.device, steps.dtype)
        for layer in self.decoder:
            x = layer(x, memory)
        scores = torch.stack([scorer(memory[:, :n], x) for scorer in self.scorers], dim=-1)
        return self.readout(scores).squeeze(-1)
