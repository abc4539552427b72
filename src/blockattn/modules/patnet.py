"""PATNet's partial attention mixers PAT_ch, PAT_sp, PAT_sf and the block around them.

Huang et al., "Partial Convolution Meets Visual Attention" (PATNet, arXiv 2503.03148) and its
extension "Partial Channel Network" (PartialNet, arXiv 2502.01303), official code
haiduo/PartialNet (`models/partialnet.py`). As in FasterNet's PConv, the first `c_p = C / n_div`
channels (n_div = 4) get a dense 3x3 conv; PAT attends over the other `u = C - c_p` channels
instead of passing them through. Inputs `[B, C, H, W]`.

- `PATChannel` (PAT_ch, stages 1-3): per untouched channel the spatial mean and unbiased std
  form a `u x 1 x 2` style tensor; a full `(1, 2)` conv (u -> u, no bias), BN and Hardsigmoid give
  the gate g; the channels become `BN(x2 * g)`. 7,104 parameters at C = 64.
- `PATSpatial` (PAT_sp, the last layer of the MLP): first C/2 channels `a * hardsigmoid(W a)` then
  BN (W: 1x1 conv C/2 -> 1), last C/2 channels BN then a 1x1 conv. 1,184 parameters at C = 64.
- `PATSelf` (PAT_sf, last stage): LayerNorm over channels, then multi-head self-attention over all
  H*W tokens of the untouched channels (qkv without bias, 4 heads, scale d^-1/2, proj + dropout
  0.1), through the block engine with a full layout. Differences from the official module, by
  design: the iRPE key bias (81 buckets per head) and the attention-probability dropout are not
  included, because the engine takes no additive bias and computes the exact softmax.
- `PATBlock`: `mixer="ch"`: `x + DropPath(MLP(PAT_ch(x)))` (one residual, FasterNet style);
  `mixer="sf"`: `x = x + PAT_sf(x); x + DropPath(MLP(x))`. MLP = 1x1 (C -> rC, no bias) -> BN ->
  act -> 1x1 (rC -> C, no bias) [-> PAT_sp when `spatial_attn`], r = 2. 23,744 parameters at
  C = 64 with PAT_ch and no PAT_sp.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import blockattn
from blockattn.modules._block_checks import check_choice, check_image, check_positive_int, check_same_device_dtype
from blockattn.patterns import full

__all__ = ["PATChannel", "PATSpatial", "PATSelf", "PATBlock"]


def _split(channels: int, n_div: int) -> int:
    check_positive_int("channels", channels)
    check_positive_int("n_div", n_div)
    if not 0 < channels // n_div < channels:
        raise ValueError(f"channels // n_div must leave both parts non-empty, got channels={channels}, n_div={n_div}")
    return channels // n_div


class PATChannel(nn.Module):
    """PAT_ch: 3x3 conv on the first C/n_div channels, Gaussian (mean, std) channel attention on the rest."""

    def __init__(self, channels: int, n_div: int = 4):
        super().__init__()
        self.channels, self.touched = channels, _split(channels, n_div)
        u = channels - self.touched
        self.conv = nn.Conv2d(self.touched, self.touched, 3, padding=1, bias=False)
        self.style_conv = nn.Conv2d(u, u, (1, 2), bias=False)
        self.style_norm = nn.BatchNorm2d(u)
        self.out_norm = nn.BatchNorm2d(u)

    def gate(self, x2: Tensor) -> Tensor:
        """g `[B, u, 1, 1]` in [0, 1] from each channel's spatial mean and unbiased std."""
        flat = x2.flatten(2)
        style = torch.stack([flat.mean(-1), flat.std(-1)], dim=-1)[:, :, None]   # [B, u, 1, 2]
        return nn.functional.hardsigmoid(self.style_norm(self.style_conv(style)))

    def forward(self, x: Tensor) -> Tensor:
        check_image("x", x, self.channels)
        check_same_device_dtype(self, "x", x)
        x1, x2 = x.split([self.touched, self.channels - self.touched], dim=1)
        return torch.cat([self.conv(x1), self.out_norm(x2 * self.gate(x2))], dim=1)


class PATSpatial(nn.Module):
    """PAT_sp over `[B, C, H, W]`: a spatial Hardsigmoid gate on the first C/2 channels, BN + 1x1 on the rest."""

    def __init__(self, channels: int):
        super().__init__()
        check_positive_int("channels", channels)
        if channels % 2:
            raise ValueError(f"channels must be even, got {channels}")
        self.channels, half = channels, channels // 2
        self.gate_conv = nn.Conv2d(half, 1, 1, bias=False)
        self.gate_norm = nn.BatchNorm2d(half)
        self.rest_norm = nn.BatchNorm2d(half)
        self.rest_conv = nn.Conv2d(half, half, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        check_image("x", x, self.channels)
        check_same_device_dtype(self, "x", x)
        a, b = x.chunk(2, dim=1)
        a = self.gate_norm(a * nn.functional.hardsigmoid(self.gate_conv(a)))
        return torch.cat([a, self.rest_conv(self.rest_norm(b))], dim=1)


class PATSelf(nn.Module):
    """PAT_sf: 3x3 conv on the first C/n_div channels, global multi-head self-attention on the rest."""

    def __init__(self, channels: int, n_div: int = 4, heads: int = 4, *, proj_drop: float = 0.1,
                 backend: str = "auto"):
        super().__init__()
        self.channels, self.touched = channels, _split(channels, n_div)
        u = channels - self.touched
        check_positive_int("heads", heads)
        if u % heads:
            raise ValueError(f"heads must divide the attended channels C - C // n_div = {u}, got {heads}")
        self.heads, self.backend = heads, backend
        self.conv = nn.Conv2d(self.touched, self.touched, 3, padding=1, bias=False)
        self.norm = nn.LayerNorm(u, eps=1e-6)
        self.qkv = nn.Linear(u, 3 * u, bias=False)
        self.proj = nn.Linear(u, u)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x2: Tensor) -> Tensor:
        b, u, h, w = x2.shape
        tokens = self.norm(x2.flatten(2).transpose(1, 2))                          # [B, HW, u]
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, u // self.heads).permute(2, 0, 3, 1, 4)
        out = blockattn.attention(q, k, v, full(h * w), backend=self.backend)      # [B, heads, HW, d]
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, h * w, u)))
        return out.transpose(1, 2).reshape(b, u, h, w)

    def forward(self, x: Tensor) -> Tensor:
        check_image("x", x, self.channels)
        check_same_device_dtype(self, "x", x)
        x1, x2 = x.split([self.touched, self.channels - self.touched], dim=1)
        return torch.cat([self.conv(x1), self.attend(x2)], dim=1)


class PATBlock(nn.Module):
    """A PATNet block over `[B, C, H, W]` with mixer "ch" (PAT_ch) or "sf" (PAT_sf)."""

    def __init__(self, channels: int, *, mixer: str = "ch", n_div: int = 4, mlp_ratio: float = 2.0,
                 spatial_attn: bool = False, heads: int = 4, act: type[nn.Module] = nn.GELU, drop_path: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        check_choice("mixer", mixer, ("ch", "sf"))
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
        if not isinstance(drop_path, (int, float)) or not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
        self.channels, self.mixer_kind, self.drop_path = channels, mixer, float(drop_path)
        self.mixer = PATChannel(channels, n_div) if mixer == "ch" else PATSelf(channels, n_div, heads, backend=backend)
        hidden = int(channels * mlp_ratio)
        layers = [nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
                  nn.Conv2d(hidden, channels, 1, bias=False)]
        if spatial_attn:
            layers.append(PATSpatial(channels))
        self.mlp = nn.Sequential(*layers)

    def _drop_path(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_path == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) >= self.drop_path
        return x * keep / (1.0 - self.drop_path)

    def forward(self, x: Tensor) -> Tensor:
        check_image("x", x, self.channels)
        if self.mixer_kind == "ch":
            return x + self._drop_path(self.mlp(self.mixer(x)))
        x = x + self.mixer(x)
        return x + self._drop_path(self.mlp(x))
