"""Attention over previously decoded channel slices: an entropy-model context, inspired by S2LIC's ACGC.

Wang et al., "S2LIC: Learned Image Compression with the SwinV2 Block, Adaptive Channel-wise and
Global-inter Attention Context" (arXiv 2403.14471; code wyq2021/S2LIC, `code/s2lic.py`). There the
latent `y` (M channels) is coded in slices of S channels; slice i's Gaussian (mean, scale) comes from two
context models over the concatenated decoded slices `y_<i` (S·i channels, i heads) plus the hyperprior:
ACCTX, a channel-wise attention context (2S outputs), and AGCTX, a global inter-slice context (S
outputs). Their layer definitions live in a modified CompressAI that is not published, so this module is
**inspired by** them, not a reproduction; the choices below are ours:

- `ChannelContext` (ACCTX's role): one head per decoded slice, attention between channels. Per head the
  tokens are the S channels of that slice and each token's features are its H·W values; queries and keys
  are L2-normalised over H·W and scaled by a learned per-head temperature (Restormer's transposed
  attention), so the map is S x S per head: cost O(S²·HW), linear in the image size. Through the engine
  (a dense layout over S tokens).
- `GlobalSliceContext` (AGCTX's role): spatial attention over all H·W positions, queries and keys from
  every decoded slice, values from the latest one, so each position gathers the latest slice's values
  from positions whose earlier slices look alike. Plain global attention (S2LIC refines the weights
  deformably); through the engine with a dense layout over the H·W tokens.
- `SliceEntropyContext`: both, concatenated (with the hyperprior's features when given), mapped by 1x1
  convolutions to slice i's (mean, scale). No checkerboard two-pass, no latent residual prediction.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blockattn
from blockattn import patterns
from blockattn.modules._block_checks import check_positive_int, check_same_device_dtype, check_tensor


@functools.lru_cache(maxsize=16)
def _full(length: int):
    # every channel (or position) attends to every other: one layout per length, built once
    return patterns.full(length)


class ChannelContext(nn.Module):
    """Channel-wise attention over `decoded` slices `[B, S·slices, H, W]` -> `[B, out_channels, H, W]`."""

    def __init__(self, slice_channels: int, slices: int, out_channels: int):
        super().__init__()
        self.s = check_positive_int("slice_channels", slice_channels)
        self.slices = check_positive_int("slices", slices)
        channels = self.s * self.slices
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.qkv_dw = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3 * channels)
        self.temperature = nn.Parameter(torch.ones(self.slices, 1, 1))
        self.proj = nn.Conv2d(channels, check_positive_int("out_channels", out_channels), 1)

    def forward(self, decoded: Tensor) -> Tensor:
        b, _, h, w = check_tensor("decoded", decoded, 4, f"[B, {self.s * self.slices}, H, W]",
                                  d1=self.s * self.slices).shape
        check_same_device_dtype(self, "decoded", decoded)
        q, k, v = self.qkv_dw(self.qkv(decoded)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.slices, self.s, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.temperature  # the temperature as the scale, one per head
        k = F.normalize(k, dim=-1)
        out = blockattn.attention(q, k, v, _full(self.s), scale=1.0)
        return self.proj(out.reshape(b, self.s * self.slices, h, w))


class GlobalSliceContext(nn.Module):
    """Spatial attention: queries/keys from all decoded slices, values from the latest slice."""

    def __init__(self, slice_channels: int, slices: int, *, dim: int = 32, heads: int = 2):
        super().__init__()
        self.s = check_positive_int("slice_channels", slice_channels)
        self.slices = check_positive_int("slices", slices)
        self.heads = check_positive_int("heads", heads)
        if check_positive_int("dim", dim) % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.dim = dim
        self.qk = nn.Conv2d(self.s * self.slices, 2 * dim, 1)
        self.v = nn.Conv2d(self.s, dim, 1)
        self.proj = nn.Conv2d(dim, self.s, 1)

    def forward(self, decoded: Tensor) -> Tensor:
        b, _, h, w = check_tensor("decoded", decoded, 4, f"[B, {self.s * self.slices}, H, W]",
                                  d1=self.s * self.slices).shape
        check_same_device_dtype(self, "decoded", decoded)
        q, k = self.qk(decoded).chunk(2, dim=1)
        v = self.v(decoded[:, -self.s:])
        # [B, C, H, W] -> [B, heads, HW, C / heads]
        split = lambda t: t.reshape(b, self.heads, self.dim // self.heads, h * w).transpose(-1, -2)  # noqa: E731
        out = blockattn.attention(split(q), split(k), split(v), _full(h * w))
        return self.proj(out.transpose(-1, -2).reshape(b, self.dim, h, w))


class SliceEntropyContext(nn.Module):
    """(mean, scale) `[B, S, H, W]` each of slice `slices` (0-based) from the decoded slices before it.

    decoded: `[B, S·slices, H, W]`; hyper: optional hyperprior features `[B, hyper_channels, H, W]`.
    """

    def __init__(self, slice_channels: int, slices: int, *, hyper_channels: int = 0, hidden: int = 64,
                 dim: int = 32, heads: int = 2):
        super().__init__()
        self.s = check_positive_int("slice_channels", slice_channels)
        self.slices = check_positive_int("slices", slices)
        if isinstance(hyper_channels, bool) or not isinstance(hyper_channels, int) or hyper_channels < 0:
            raise ValueError(f"hyper_channels must be a non-negative int, got {hyper_channels!r}")
        self.hyper_channels = hyper_channels
        self.channel = ChannelContext(self.s, self.slices, 2 * self.s)
        self.spatial = GlobalSliceContext(self.s, self.slices, dim=dim, heads=heads)
        self.params = nn.Sequential(nn.Conv2d(3 * self.s + hyper_channels, hidden, 1), nn.GELU(),
                                    nn.Conv2d(hidden, hidden, 1), nn.GELU(), nn.Conv2d(hidden, 2 * self.s, 1))

    def forward(self, decoded: Tensor, hyper: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = [self.channel(decoded), self.spatial(decoded)]
        if self.hyper_channels:
            if hyper is None:
                raise ValueError(f"hyper must be given: this context was built with hyper_channels="
                                 f"{self.hyper_channels}")
            check_tensor("hyper", hyper, 4, f"[B={decoded.shape[0]}, {self.hyper_channels}, H, W]",
                         d0=decoded.shape[0], d1=self.hyper_channels, d2=decoded.shape[2], d3=decoded.shape[3])
            features.append(hyper)
        elif hyper is not None:
            raise ValueError("hyper was given but this context was built with hyper_channels=0")
        mean, scale = self.params(torch.cat(features, dim=1)).chunk(2, dim=1)
        return mean, F.softplus(scale) + 0.11  # CompressAI's lower bound on the scale


def gaussian_bits(y: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """Bits to code the integers `round(y)` under N(mean, scale) discretised to unit bins (CompressAI's
    GaussianConditional likelihood), summed over every element."""
    values = torch.round(y) - mean
    normal = torch.distributions.Normal(torch.zeros((), device=y.device, dtype=y.dtype),
                                        torch.ones((), device=y.device, dtype=y.dtype))
    upper = normal.cdf((0.5 - values.abs()) / scale)
    lower = normal.cdf((-0.5 - values.abs()) / scale)
    likelihood = (upper - lower).clamp_min(1e-9)
    return -torch.log2(likelihood).sum()
