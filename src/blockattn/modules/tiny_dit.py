"""A small diffusion transformer (DiT) whose self-attention heads can be perturbed one by one (SoftPAG).

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023): patchify, learned position
embedding, blocks of (adaLN-Zero-modulated) self-attention and MLP conditioned on the timestep, a
zero-initialised linear head predicting the noise. Sized for 8x8 one-channel images on a CPU.
Every attention head runs through the engine with the dense layout; a head given a SoftPAG strength
u mixes in the diagonal (identity) layout's output, A -> (1 - u) A + u I (Ahn et al.,
arXiv 2506.10978; `blockattn.analysis.softpag`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from blockattn._checks import int_arg
from blockattn.analysis.softpag import softpag_attention

__all__ = ["PerturbableSelfAttention", "TinyDiT", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal embedding of integer timesteps `t [B]` -> `[B, dim]`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class PerturbableSelfAttention(nn.Module):
    """Multi-head self-attention `[B, L, C] -> [B, L, C]` with a per-head SoftPAG strength
    `identity_strength [H]` (all zero: plain attention)."""

    def __init__(self, dim: int, heads: int, *, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide dim={dim}, got {heads}")
        self.dim, self.heads, self.backend = dim, heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("identity_strength", torch.zeros(heads), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        out = softpag_attention(q, k, v, self.identity_strength, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, length, self.dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = PerturbableSelfAttention(dim, heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    """Noise prediction `eps(x_t, t)` for images `[B, C, S, S]` (S divisible by `patch`)."""

    def __init__(self, *, image_size: int = 8, channels: int = 1, patch: int = 2, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.image_size, self.channels = int_arg("image_size", image_size), int_arg("channels", channels)
        self.patch, self.dim = int_arg("patch", patch), int_arg("dim", dim)
        self.depth, self.heads = int_arg("depth", depth), int_arg("heads", heads)
        if image_size % patch:
            raise ValueError(f"patch must divide image_size={image_size}, got {patch}")
        self.grid = image_size // patch
        patch_dim = channels * patch * patch
        self.embed = nn.Linear(patch_dim, dim)
        self.position = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * 0.02)
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, backend) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.head = nn.Linear(dim, patch_dim)
        for layer in (self.final_modulation[1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def attention_layers(self) -> list[PerturbableSelfAttention]:
        return [block.attn for block in self.blocks]

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not isinstance(t, Tensor):
            raise TypeError("x and t must be torch.Tensors")
        expected = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be [B] = [{x.shape[0]}], got {list(t.shape)}")
        batch, p, g = x.shape[0], self.patch, self.grid
        tokens = x.view(batch, self.channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(batch, g * g, -1)
        h = self.embed(tokens) + self.position
        c = self.time(timestep_embedding(t, self.dim))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        out = self.head(self.final_norm(h) * (1 + scale) + shift)
        return out.view(batch, g, g, self.channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
