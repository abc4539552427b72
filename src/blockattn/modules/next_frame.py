"""A small Next-Frame-Diffusion-style autoregressive frame model: block-causal attention, a KV cache,
few-step frame sampling and speculative multi-frame steps.

"Playing with Transformer at 30+ FPS via Next-Frame Diffusion" (NFD). The model is a stack of
pre-norm transformer blocks over frames of `frame_len` tokens with block-causal attention
(bidirectional inside a frame, causal across frames). Inference keeps a KV cache of clean frames:
a new frame starts from noise plus its action embedding and is refined for a few steps
(consistency-distilled sampling) while its tokens attend to the cache and to themselves; the clean
frame is then committed to the cache. Speculative sampling generates the next `speculate` frames
at once with the current action, keeps them while the real actions agree, and drops the rest from
the cache. Because attention is block-causal, frame f never depends on later frames, so dropping
speculated frames leaves the cache exactly as if they had never been computed.

This is an example of the attention machinery, not a trained video model.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

import blockattn
from blockattn.patterns.block_causal import block_causal

__all__ = ["FrameKVCache", "NextFrameTransformer"]


@dataclasses.dataclass
class FrameKVCache:
    """Per-layer keys and values `[B, H, frames * frame_len, D]` of the committed (clean) frames."""
    frame_len: int
    keys: list = dataclasses.field(default_factory=list)
    values: list = dataclasses.field(default_factory=list)

    @property
    def frames(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[2] // self.frame_len

    def truncate(self, frames: int) -> None:
        """Keep the first `frames` frames (drop rejected speculative frames)."""
        if isinstance(frames, bool) or not isinstance(frames, int) or not 0 <= frames <= self.frames:
            raise ValueError(f"frames must be an int in [0, {self.frames}], got {frames!r}")
        keep = frames * self.frame_len
        self.keys = [k[:, :, :keep] for k in self.keys]
        self.values = [v[:, :, :keep] for v in self.values]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, past_k, past_v, frame_len, backend):
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        frames = k.shape[2] // frame_len
        layout = block_causal(frame_len, frames, q_len=length, block_q=frame_len, block_k=frame_len)
        out = blockattn.attention(q, k, v, layout, backend=backend)
        x = x + self.proj(out.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x)), k, v


class NextFrameTransformer(nn.Module):
    """Block-causal transformer over frames of `frame_len` tokens of width `dim`."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, frame_len: int = 16, num_actions: int = 4,
                 mlp_ratio: int = 2, backend: str = "auto"):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("layers", layers), ("frame_len", frame_len),
                            ("num_actions", num_actions), ("mlp_ratio", mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.dim, self.frame_len, self.backend = dim, frame_len, backend
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(layers))
        self.action_embedding = nn.Embedding(num_actions, dim)
        self.step_embedding = nn.Embedding(16, dim)

    def forward(self, x: Tensor, cache: FrameKVCache | None = None, *, commit: bool = True) -> Tensor:
        """`x [B, n * frame_len, dim]`: n new frames after the cached ones. With `commit`, their keys and
        values are appended to `cache`; without, the cache is only read (denoising steps)."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != self.dim or x.shape[1] % self.frame_len:
            raise ValueError(f"x must be [B, n * frame_len={self.frame_len}, dim={self.dim}], got "
                             f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if cache is not None and cache.frame_len != self.frame_len:
            raise ValueError(f"cache.frame_len={cache.frame_len} does not match frame_len={self.frame_len}")
        new_keys, new_values = [], []
        for layer, block in enumerate(self.blocks):
            past = cache is not None and cache.frames > 0
            x, k, v = block(x, cache.keys[layer] if past else None, cache.values[layer] if past else None,
                            self.frame_len, self.backend)
            new_keys.append(k)
            new_values.append(v)
        if cache is not None and commit:
            cache.keys, cache.values = new_keys, new_values
        return x

    def _noise(self, frame_index: int, batch: int, seed: int, dtype) -> Tensor:
        # noise depends only on the frame's index, so speculative and step-by-step runs draw the same
        generator = torch.Generator().manual_seed(seed * 1_000_003 + frame_index)
        return torch.randn(batch, self.frame_len, self.dim, generator=generator).to(dtype)

    @torch.no_grad()
    def generate(self, context: Tensor, actions: list[int], *, steps: int = 2, speculate: int = 1,
                 seed: int = 0) -> tuple[Tensor, FrameKVCache, int]:
        """NFD's inference loop. `context [B, F0 * frame_len, dim]` holds clean frames; one frame is
        generated per entry of `actions`. Returns (frames `[B, len(actions) * frame_len, dim]`,
        the cache, the number of model calls)."""
        if isinstance(speculate, bool) or not isinstance(speculate, int) or speculate < 1:
            raise ValueError(f"speculate must be a positive int, got {speculate!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 16:
            raise ValueError(f"steps must be an int in [1, 16], got {steps!r}")
        cache = FrameKVCache(self.frame_len)
        self(context, cache)
        batch, produced, calls, f = context.shape[0], [], 0, 0
        while f < len(actions):
            n = min(speculate, len(actions) - f)
            action = self.action_embedding(torch.tensor(actions[f])).to(context.dtype)
            x = torch.cat([self._noise(f + j, batch, seed, context.dtype) for j in range(n)], dim=1) + action
            for step in range(steps):
                x = self(x + self.step_embedding(torch.tensor(step)).to(x.dtype), cache, commit=False)
                calls += 1
            start = cache.frames
            self(x, cache)  # commit the clean frames
            calls += 1
            accepted = 1
            while accepted < n and actions[f + accepted] == actions[f]:
                accepted += 1
            cache.truncate(start + accepted)
            produced.append(x[:, :accepted * self.frame_len])
            f += accepted
        return torch.cat(produced, dim=1), cache, calls
