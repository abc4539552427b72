"""StyleSwin's double attention: half of the heads in local windows, half in shifted windows.

Zhang et al., "StyleSwin: Transformer-based GAN for High-resolution Image Generation" (CVPR 2022),
official `StyleSwinTransformerBlock`: one qkv projection; channels `[0, C/2)` (the first half of the
heads) attend inside regular `window` x `window` windows, channels `[C/2, C)` inside windows shifted
by `window // 2` (Swin's cyclic shift with its mask); the halves are concatenated and projected.
Here both halves are one per-head layout, so a single engine call computes them.

Each half has Swin's relative position bias (`WindowAttention`): a learned table
`[(2w − 1)^2, heads / 2]` indexed by the query-minus-key offset of the two tokens' window
coordinates, added to the scaled logits. The engine takes no additive bias, so the bias is folded
into the scores: q is extended by its bias row over the w^2 window coordinates (divided by the
scale) and k by a one-hot of its window coordinate (w^2 extra channels per token, O(L·w^2)).
On grids not longer than the window the window covers the axis (Swin's rule, per axis here) and
indexes the same table. `rel_pos_bias=False` leaves the bias out. The style-driven AdaIN norms and
the MLP of the full block live outside this module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blockattn
from blockattn.modules._grid_attention import GridAttention
from blockattn.patterns.windows import double_window

__all__ = ["StyleSwinDoubleAttention"]


class StyleSwinDoubleAttention(GridAttention):
    ndim = 2

    def __init__(self, dim: int, heads: int, *, window: int = 8, rel_pos_bias: bool = True, qkv_bias: bool = True,
                 backend: str = "auto"):
        super().__init__(dim, heads, qkv_bias=qkv_bias, backend=backend)
        if heads % 2:
            raise ValueError(f"heads must be even (half local, half shifted), got {heads}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not isinstance(rel_pos_bias, bool):
            raise TypeError(f"rel_pos_bias must be a bool, got {type(rel_pos_bias).__name__}")
        self.window = window
        if rel_pos_bias:
            # one table per half (the official block has two WindowAttention modules); Swin's init
            self.bias_table = nn.Parameter(torch.empty(2, (2 * window - 1) ** 2, heads // 2))
            nn.init.trunc_normal_(self.bias_table, std=0.02)
        else:
            self.bias_table = None

    def build_layout(self, grid):
        return double_window(grid, heads=self.heads, window=self.window)

    def _window_coords(self, grid, device) -> Tensor:
        """long `[2 halves, L, 2]`: each token's coordinate inside its (regular / shifted) window."""
        coords = torch.cartesian_prod(*[torch.arange(n, device=device) for n in grid])
        halves = []
        for shifted in (False, True):
            axes = []
            for a, n in enumerate(grid):
                w, s = (n, 0) if n <= self.window else (self.window, self.window // 2 if shifted else 0)
                axes.append((coords[:, a] - s) % n % w)  # position after Swin's roll by −s, inside its window
            halves.append(torch.stack(axes, dim=-1))
        return torch.stack(halves)

    def forward(self, x: Tensor) -> Tensor:
        if self.bias_table is None:
            return super().forward(x)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, H, W, C={self.dim}] (channels last), got {list(x.shape)}")
        batch, grid = x.shape[0], tuple(x.shape[1:-1])
        layout = self.layout(grid)
        length, head_dim, w = math.prod(grid), self.dim // self.heads, self.window
        scale = head_dim ** -0.5
        q, k, v = self.qkv(x.reshape(batch, length, self.dim)).view(batch, length, 3, self.heads, head_dim) \
            .permute(2, 0, 3, 1, 4)
        coords = self._window_coords(grid, x.device)  # [2, L, 2]
        slot = torch.cartesian_prod(torch.arange(w, device=x.device), torch.arange(w, device=x.device))  # [w², 2]
        offset = coords[:, :, None, :] - slot[None, None] + w - 1  # query minus key window coordinate
        index = offset[..., 0] * (2 * w - 1) + offset[..., 1]  # [2, L, w²]
        half = self.heads // 2
        bias = torch.cat([self.bias_table[h][index[h]].permute(2, 0, 1) for h in range(2)])  # [heads, L, w²]
        key_slot = coords[..., 0] * w + coords[..., 1]  # [2, L]
        one_hot = F.one_hot(key_slot, w * w).to(q.dtype).repeat_interleave(half, dim=0)  # [heads, L, w²]
        q = torch.cat([q, (bias / scale).to(q.dtype).expand(batch, -1, -1, -1)], dim=-1)
        k = torch.cat([k, one_hot.expand(batch, -1, -1, -1)], dim=-1)
        v = F.pad(v, (0, w * w))
        out = blockattn.attention(q, k, v, layout, scale=scale, backend=self.backend)[..., :head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, *grid, self.dim))
