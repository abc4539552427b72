"""A nanoGPT-sized pre-LN decoder with RoPE whose attention is a pluggable module, for the small
trained experiments of the trainable methods (Landmark, DMA). An optional short causal depthwise
convolution before each attention (as in the project's MQAR model, after Zoology/BASED) lets a tiny
CPU-trained model form the key -> value shift quickly. Optional learned absolute position embeddings
(`positions=L`, Zoology's `max_position_embeddings`) put each token's position into its values."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor, nn


def rotary(x: Tensor, base: float = 10000.0) -> Tensor:
    """RoPE (rotate-half convention) over `[B, H, L, D]` at positions 0..L-1."""
    length, dim = x.shape[2], x.shape[3]
    inv = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.arange(length, device=x.device, dtype=torch.float32).view(-1, 1) * inv
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(x.dtype) for f in (torch.cos, torch.sin))
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mixer: nn.Module, mlp_ratio: int, conv: int):
        super().__init__()
        self.heads = heads
        self.conv = nn.Conv1d(dim, dim, conv, groups=dim, padding=conv - 1) if conv else None
        self.norm0 = nn.LayerNorm(dim) if conv else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        if self.conv is not None:
            x = x + self.conv(self.norm0(x).transpose(1, 2))[..., :length].transpose(1, 2)
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = self.mixer(rotary(q), rotary(k), v)
        x = x + self.proj(out.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    """`tokens [B, L] -> logits [B, L, vocab]`; `make_mixer(layer)` returns each layer's attention
    module `(q, k, v) [B, H, L, D] -> [B, H, L, D]` (q and k already rotated)."""

    def __init__(self, vocab: int, make_mixer: Callable[[int], nn.Module], *, dim: int = 64, heads: int = 2,
                 layers: int = 2, mlp_ratio: int = 4, conv: int = 0, positions: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(positions, dim) if positions else None
        self.blocks = nn.ModuleList(Block(dim, heads, make_mixer(i), mlp_ratio, conv) for i in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        if self.positions is not None:
            if tokens.shape[1] > self.positions.num_embeddings:
                raise ValueError(f"tokens hold {tokens.shape[1]} positions, the model embeds at most "
                                 f"{self.positions.num_embeddings}")
            x = x + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def fit(model: nn.Module, optimiser: torch.optim.Optimizer, steps: int, next_batch: Callable, progress=None):
    """Minimise token cross-entropy (targets -100 ignored) over `steps` batches `next_batch(step) ->
    (inputs, targets)`, with a 5% linear warm-up then cosine decay and gradient clipping at 1.
    Returns (losses, seconds)."""
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, start = [], time.perf_counter()
    for step in range(steps):
        inputs, targets = next_batch(step)
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    return losses, time.perf_counter() - start
