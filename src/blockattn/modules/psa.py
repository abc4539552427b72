"""Polarized Self-Attention (PSA), parallel and sequential, in the paper's form and the official code's form.

Liu, Liu, Fan, Huang, "Polarized Self-Attention: Towards High-quality Pixel-wise Regression"
(arXiv 2107.00782); official code DeLightCMU/PSA (`PSA_p`, `PSA_s`). Input `[B, C, H, W]`, output
the same shape; the internal width is C/2 everywhere.

Rule (paper form, `form="paper"`):
- channel branch: `z = W_v(X) . softmax_HW(W_q(X))` (W_v: C -> C/2, W_q: C -> 1), then
  `A_ch = sigmoid(LN_C(W_z z))` (W_z: C/2 -> C) and `Z_ch = A_ch * X`;
- spatial branch: `A_sp = sigmoid(softmax_C/2(GAP(W_q'(X))) . W_v'(X))` and `Z_sp = A_sp * X`;
- `layout="parallel"`: `Z_ch(X) + Z_sp(X)`; `layout="sequential"`: `Z_sp(Z_ch(X))`.
Both softmax-weighted sums (over the HW pixels, and over the C/2 channels) run through the
block engine as one-query attention with given logits (`_engine_pool.softmax_pool`).

The official code (`form="official"`) differs: no biases on the four projections (Kaiming
fan-in init); parallel `W_z` is one bias-free 1x1 conv without LN; sequential `W_z` is a
bottleneck `1x1 (C/2 -> C/8) -> LN -> ReLU -> 1x1 (C/8 -> C)`; the spatial branch gets no softmax
on the pooled query and instead, in parallel, softmaxes the product over HW before the sigmoid,
and in sequential softmaxes each value channel over HW (those two are gates, plain PyTorch).
Parameter counts (C = 512): official parallel 524,800, official sequential 443,584, paper
parallel 527,105.
"""
from __future__ import annotations

from torch import Tensor, nn

from blockattn.modules._block_checks import check_choice, check_image, check_positive_int, check_same_device_dtype
from blockattn.modules._engine_pool import softmax_pool

__all__ = ["PolarizedSelfAttention"]


class PolarizedSelfAttention(nn.Module):
    """PSA over `[B, C, H, W]`: `layout` "parallel" | "sequential", `form` "paper" | "official"."""

    def __init__(self, channels: int, *, layout: str = "parallel", form: str = "paper", backend: str = "auto"):
        super().__init__()
        check_positive_int("channels", channels)
        if channels % 2 or (form == "official" and layout == "sequential" and channels % 8):
            raise ValueError(f"channels must be even (a multiple of 8 for the official sequential form), "
                             f"got {channels}")
        self.channels, self.backend = channels, backend
        self.layout = check_choice("layout", layout, ("parallel", "sequential"))
        self.form = check_choice("form", form, ("paper", "official"))
        inner, bias = channels // 2, form == "paper"
        # channel-only branch (the official code calls it `spatial_pool`: it pools space)
        self.ch_wv = nn.Conv2d(channels, inner, 1, bias=bias)
        self.ch_wq = nn.Conv2d(channels, 1, 1, bias=bias)
        # spatial-only branch (`channel_pool` in the official code)
        self.sp_wv = nn.Conv2d(channels, inner, 1, bias=bias)
        self.sp_wq = nn.Conv2d(channels, inner, 1, bias=bias)
        if form == "paper":
            self.ch_wz = nn.Conv2d(inner, channels, 1)
            self.ch_norm = nn.LayerNorm(channels)
        elif layout == "parallel":
            self.ch_wz = nn.Conv2d(inner, channels, 1, bias=False)
        else:
            self.ch_wz = nn.Sequential(nn.Conv2d(inner, inner // 4, 1), nn.LayerNorm([inner // 4, 1, 1]),
                                       nn.ReLU(), nn.Conv2d(inner // 4, channels, 1))
        if form == "official":
            for conv in (self.ch_wv, self.ch_wq, self.sp_wv, self.sp_wq):
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    def channel_gate(self, x: Tensor) -> Tensor:
        """A_ch `[B, C, 1, 1]` in (0, 1)."""
        b = x.shape[0]
        values = self.ch_wv(x).flatten(2).transpose(1, 2)              # [B, HW, C/2]
        logits = self.ch_wq(x).flatten(2)                               # [B, 1, HW]
        z = softmax_pool(logits, values[:, None], backend=self.backend)  # [B, 1, C/2]
        z = self.ch_wz(z.reshape(b, -1, 1, 1))
        if self.form == "paper":
            z = self.ch_norm(z.flatten(1)).reshape(b, -1, 1, 1)
        return z.sigmoid()

    def spatial_gate(self, x: Tensor) -> Tensor:
        """A_sp `[B, 1, H, W]` in (0, 1)."""
        b, _, h, w = x.shape
        values = self.sp_wv(x).flatten(2)                               # [B, C/2, HW]
        query = self.sp_wq(x).mean((2, 3))                              # [B, C/2]
        if self.form == "paper":
            context = softmax_pool(query[:, None], values[:, None], backend=self.backend)[:, 0]
        elif self.layout == "parallel":
            context = (query[:, None] @ values)[:, 0].softmax(-1)
        else:
            context = (query[:, None] @ values.softmax(-1))[:, 0]
        return context.reshape(b, 1, h, w).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        check_image("x", x, self.channels)
        check_same_device_dtype(self, "x", x)
        if self.layout == "parallel":
            return self.channel_gate(x) * x + self.spatial_gate(x) * x
        x = self.channel_gate(x) * x
        return self.spatial_gate(x) * x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layout={self.layout!r}, form={self.form!r}"
