"""HaloNet's blocked local self-attention with a halo, as a module over `[B, H, W, C]`.

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (CVPR 2021).
Each b x b query block attends to the (b + 2h) x (b + 2h) key window around it (paper defaults
b = 8, h = 3, 8 heads). Tokens run in the b x b tiled order, so each query block is exactly one
engine tile. The only public code (timm's `HaloAttn`, a WIP by its own account) is followed on:

- borders (`border="zero_pad"`, default): keys and values are zero-padded, so every query sees
  (b + 2h)^2 window slots and a padded slot contributes logit 0 (plus its relative logit) with
  value 0. The engine runs on the in-image keys only and returns the log-sum-exp; the padded
  slots' softmax mass is then added in closed form, per query, which rescales the output by
  Z_in / (Z_in + Z_pad). `border="mask"` drops the padded slots instead (smaller border windows).
- relative-position logits (`rel_pos=True`): timm's factorised `PosEmbedRel`, logit
  `q·k·scale + q·R_h[j_y − i_y + w − 1] + q·R_w[j_x − i_x + w − 1]` (i: the query's position in its
  block, j: the key's position in the window of side w = b + 2h; tables shared by the heads). The
  engine takes no additive bias, so the bias is folded into the scores: q is extended by its
  `q·R_h` logit for every image row and column (divided by the scale) and k by one-hot row and
  column indicators, which costs H + W extra channels per token (O(L·(H + W)) memory, no [L, L]).

timm's defaults differ in `qkv_bias` (timm False, here True); its query striding is not included.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blockattn
from blockattn.modules._grid_attention import GridAttention
from blockattn.patterns._grid import token_coords
from blockattn.patterns.halo import halo
from blockattn.patterns.neighborhood import from_tiled, to_tiled

__all__ = ["HaloAttention"]

_BORDERS = ("zero_pad", "mask")


class HaloAttention(GridAttention):
    ndim = 2

    def __init__(self, dim: int, heads: int = 8, *, block_size: int = 8, halo: int = 3, border: str = "zero_pad",
                 rel_pos: bool = False, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__(dim, heads, qkv_bias=qkv_bias, backend=backend)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
            raise ValueError(f"halo must be a non-negative int, got {halo!r}")
        if border not in _BORDERS:
            raise ValueError(f"border must be one of {_BORDERS}, got {border!r}")
        if not isinstance(rel_pos, bool):
            raise TypeError(f"rel_pos must be a bool, got {type(rel_pos).__name__}")
        self.block_size, self.halo, self.border = block_size, halo, border
        self.tile_shape = (block_size, block_size)
        self.window = block_size + 2 * halo
        head_dim = dim // heads
        if rel_pos:
            scale = head_dim ** -0.5  # timm initialises the tables with std = scale
            self.height_rel = nn.Parameter(torch.randn(2 * self.window - 1, head_dim) * scale)
            self.width_rel = nn.Parameter(torch.randn(2 * self.window - 1, head_dim) * scale)
        else:
            self.height_rel = self.width_rel = None

    def build_layout(self, grid):
        b = self.block_size
        return halo(grid, block_size=b, halo=self.halo, block_q=b * b, block_k=b * b, tile_shape=self.tile_shape)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, block_size={self.block_size}, halo={self.halo}, "
                f"border={self.border!r}, rel_pos={self.height_rel is not None}")

    def _window_logits(self, q: Tensor, table: Tensor | None, local: Tensor) -> Tensor:
        """Relative logits of every query for the w window coordinates of one axis: `[B, H, L, w]`."""
        w = self.window
        if table is None:
            return q.new_zeros(*q.shape[:3], w)
        index = torch.arange(w, device=q.device).view(1, -1) - local.view(-1, 1) + w - 1
        return (q @ table.transpose(0, 1)).gather(-1, index.expand(*q.shape[:2], -1, -1))

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, H, W, C={self.dim}] (channels last), got {list(x.shape)}")
        batch, grid = x.shape[0], tuple(x.shape[1:-1])
        layout = self.layout(grid)  # first, so a grid the pattern rejects is reported in its terms
        length, head_dim = math.prod(grid), self.dim // self.heads
        scale = head_dim ** -0.5
        qkv = self.qkv(x.reshape(batch, length, self.dim))
        q, k, v = qkv.view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = (to_tiled(t, grid, self.tile_shape) for t in (q, k, v))
        coords = token_coords(grid, self.tile_shape).to(x.device)  # [L, 2], tiled order
        start = coords - coords % self.block_size - self.halo  # first window coordinate per axis
        logits = [self._window_logits(q, table, coords[:, a] % self.block_size)
                  for a, table in enumerate((self.height_rel, self.width_rel))]
        if self.height_rel is not None:
            extra_q, extra_k = [], []
            for a, n in enumerate(grid):
                j = torch.arange(n, device=x.device).view(1, -1) - start[:, a:a + 1]  # window index of image row/col
                inside = (j >= 0) & (j < self.window)
                extra_q.append(logits[a].gather(-1, j.clamp(0, self.window - 1).expand(batch, self.heads, -1, -1))
                               * inside / scale)
                extra_k.append(F.one_hot(coords[:, a], n).to(q.dtype).expand(batch, self.heads, -1, -1))
            q = torch.cat([q, *extra_q], dim=-1)
            k = torch.cat([k, *extra_k], dim=-1)
            v = F.pad(v, (0, q.shape[-1] - head_dim))
        out, lse = blockattn.attention(q, k, v, layout, scale=scale, return_lse=True, backend=self.backend)
        out = out[..., :head_dim]
        if self.border == "zero_pad":
            out = out * self._in_image_share(lse, logits, start, grid).to(out.dtype).unsqueeze(-1)
        out = from_tiled(out, grid, self.tile_shape)
        return self.proj(out.transpose(1, 2).reshape(batch, *grid, self.dim))

    def _in_image_share(self, lse: Tensor, logits: list[Tensor], start: Tensor, grid) -> Tensor:
        """Z_in / (Z_in + Z_pad) per query, with Z_pad the softmax mass of the zero-padded window slots
        (value 0, logit = the slot's relative logit), summed per axis without forming the window."""
        window = torch.arange(self.window, device=lse.device).view(1, -1)
        # a finite fill: an axis without padded slots must give zero mass and finite gradients
        none = -1e30
        lse_in, lse_pad = [], []
        for a, n in enumerate(grid):
            pos = start[:, a:a + 1] + window
            inside = (pos >= 0) & (pos < n)
            lse_in.append(logits[a].float().masked_fill(~inside, none).logsumexp(-1))
            lse_pad.append(logits[a].float().masked_fill(inside, none).logsumexp(-1))
        lse_all_x = logits[1].float().logsumexp(-1)
        # padded slots: (padded row, any column) or (in-image row, padded column)
        pad = torch.logaddexp(lse_pad[0] + lse_all_x, lse_in[0] + lse_pad[1])
        return torch.exp(lse - torch.logaddexp(lse, pad))
