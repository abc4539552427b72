"""OverLoCK's ContMix dynamic convolution and its top-down (overview-first, look-closely) block.

Lou & Yu, "OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic
Kernels" (CVPR 2025, arXiv 2502.20087); official code LMMMEng/OverLoCK (`models/contmix.py`,
`models/overlock.py`: `DynamicConvBlock`). Inputs `[B, C, H, W]`.

ContMix rule (G = 2 * num_heads groups): per group, each pixel's query (1x1 conv + BN, C -> C/2,
scaled by (C/G)^-1/2) is compared with 49 region keys (7x7 average pool of the key source, 1x1
conv + BN); a shared linear map 49 -> s^2 + k^2 turns the 49 affinities into the logits of two
dynamic kernels (s = smk_size = 5, k = kernel_size = 7), each with a NATTEN-style relative position
bias. Half of the value channels are aggregated with the s x s kernel, half with the k x k one:
`out(p) = sum_{o in window(p)} softmax(logits(p) + rpb)(o) V(o)`, the window clamped inside the
image (neighborhood attention's border rule). If min(H, W) < k the map is resized so its short
side is k and pooled back afterwards.

On the engine: that aggregation is neighborhood attention with generated logits. In a window of
k consecutive positions the residues `o mod k` are all distinct, so with one-hot residue keys
`k_o = e[(o_y mod k) k + (o_x mod k)]` and the query `q_p` holding pixel p's tap logits at those
residues, `q_p . k_o` is exactly p's logit for key o; `blockattn.attention` over
`patterns.neighborhood((H, W), window=k)` with scale 1 then computes the softmax and the sum.

Blocks:
- `ContMixBlock` (the plug-and-play block): x + DWConv3x3; LN; gate = SiLU(BN(1x1)), lepe =
  BN(DW kxk), ContMix with queries, keys and values (1x1 + BN) all from the normalised map;
  then 1x1 + BN, + lepe, SE (hidden max(16, C/8)), * gate, BN -> 1x1; residual; x + DWConv3x3;
  LN -> 1x1 (4C) -> GELU -> x + DWConv3x3 -> GRN -> 1x1; residual.
- `DynamicConvBlock` (the Focus-Net block): carries a context map h (C_h channels) beside the
  features x; h <- LS(h) + LS(h_r) mixes in the fixed top-down prior h_r (except in the first
  block); queries come from x, **keys from the context channels**, so the dynamic kernels follow
  the overview. The output projection updates both x and h.
Residuals follow `res_scale` (True: LayerScale on the identity path; False: on the branch).
Difference from the official code, by design: the large-kernel lepe is the dilated reparam
block in its deploy form, one k x k depthwise conv with bias (UniRepLKNet's DRB folds into
exactly that), so training-time branch counts differ. Paper defaults: k = 7 in the last stage
(13 in stage 3), s = 5, heads [4, 8] for T, ls_init 1 in the Focus-Net, res_scale True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blockattn
from blockattn.layout import BlockLayout
from blockattn.modules._block_checks import check_image, check_positive_int, check_same_device_dtype, check_tensor
from blockattn.patterns import neighborhood, neighborhood_ranges

__all__ = ["contmix_aggregate", "ContMix", "ContMixBlock", "DynamicConvBlock"]

_REGIONS = 7


def _tap_tables(size: int, kernel: int, device) -> tuple[Tensor, Tensor]:
    """Per coordinate: the tap holding each residue `[size, k]`, and each tap's bias index `[size, k]`."""
    start = neighborhood_ranges(size, kernel)[0].to(device)
    residue = torch.arange(kernel, device=device)
    coord = torch.arange(size, device=device)
    tap_of_residue = (residue[None] - start[:, None]) % kernel
    bias_index = start[:, None] + residue[None] - coord[:, None] + kernel - 1
    return tap_of_residue, bias_index


def contmix_aggregate(logits: Tensor, values: Tensor, kernel_size: int, rpb: Tensor | None = None, *,
                      layout: BlockLayout | None = None, backend: str = "auto") -> Tensor:
    """Dynamic-kernel neighborhood aggregation through the block engine.

    Args:
        logits: `[B, G, H, W, k*k]` per-pixel kernel logits, taps in row-major order of the window.
        values: `[B, G, H, W, c]`.
        kernel_size: k (odd, <= min(H, W), k*k <= 256).
        rpb: optional `[G, 2k-1, 2k-1]` relative position bias (NATTEN indexing).
        layout: `patterns.neighborhood((H, W), window=k)`, when the caller caches it.
    Returns `[B, G, H, W, c]`: `sum_t softmax_t(logits + rpb) * values[window(p)[t]]`.
    """
    check_positive_int("kernel_size", kernel_size)
    check_tensor("logits", logits, 5, "[B, G, H, W, k*k]")
    check_tensor("values", values, 5, "[B, G, H, W, c]")
    b, g, h, w, taps = logits.shape
    k = kernel_size
    if taps != k * k or values.shape[:4] != (b, g, h, w):
        raise ValueError(f"logits must be [B, G, H, W, {k * k}] and values [B, G, H, W, c] on the same grid, "
                         f"got {list(logits.shape)} and {list(values.shape)}")
    if k % 2 == 0 or k > min(h, w) or k * k > 256:
        raise ValueError(f"kernel_size must be odd, <= min(H, W) = {min(h, w)} and <= 16, got {k}")
    device = logits.device
    tap_y, bias_y = _tap_tables(h, k, device)
    tap_x, bias_x = _tap_tables(w, k, device)
    if rpb is not None:
        if rpb.shape != (g, 2 * k - 1, 2 * k - 1):
            raise ValueError(f"rpb must have shape [G={g}, {2 * k - 1}, {2 * k - 1}], got {list(rpb.shape)}")
        bias = rpb[:, bias_y[:, None, :, None], bias_x[None, :, None, :]]       # [G, H, W, k, k]
        logits = logits + bias.reshape(1, g, h, w, k * k)
    # residue order: for residue (ry, rx) the tap (tap_y[y, ry], tap_x[x, rx])
    order = (tap_y[:, None, :, None] * k + tap_x[None, :, None, :]).reshape(1, 1, h, w, k * k)
    q = logits.gather(-1, order.expand(b, g, h, w, k * k)).reshape(b, g, h * w, k * k)
    residue = ((torch.arange(h, device=device) % k)[:, None] * k + (torch.arange(w, device=device) % k)[None])
    keys = F.one_hot(residue.reshape(-1), k * k).to(logits.dtype)                 # [HW, k*k]
    c = values.shape[-1]
    d = max(k * k, c)
    q = F.pad(q, (0, d - k * k))
    keys = F.pad(keys, (0, d - k * k)).expand(b, g, h * w, d).contiguous()
    v = F.pad(values.reshape(b, g, h * w, c), (0, d - c))
    if layout is None:
        layout = neighborhood((h, w), window=k)
    out = blockattn.attention(q, keys, v, layout, scale=1.0, backend=backend)
    return out[..., :c].reshape(b, g, h, w, c)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class ContMix(nn.Module):
    """The context-mixing dynamic kernel: queries `[B, dim, H, W]`, key source `[B, key_dim, H, W]`,
    values `[B, dim, H, W]` -> `[B, dim, H, W]` (before the output 1x1 + BN, which is included)."""

    def __init__(self, dim: int, key_dim: int | None = None, *, kernel_size: int = 7, smk_size: int = 5,
                 num_heads: int = 2, rpb_std: float = 0.02, backend: str = "auto"):
        super().__init__()
        check_positive_int("dim", dim)
        key_dim = dim if key_dim is None else check_positive_int("key_dim", key_dim)
        for name, value in (("kernel_size", kernel_size), ("smk_size", smk_size)):
            check_positive_int(name, value)
            if value % 2 == 0 or value > 15:
                raise ValueError(f"{name} must be odd and at most 15 (taps <= 256 per engine head), got {value}")
        check_positive_int("num_heads", num_heads)
        self.groups = 2 * num_heads
        if dim % (2 * self.groups):
            raise ValueError(f"dim must be a multiple of 4 * num_heads = {2 * self.groups}, got {dim}")
        self.dim, self.key_dim, self.backend = dim, key_dim, backend
        self.kernel_size, self.smk_size = kernel_size, smk_size
        self.scale = (dim // self.groups) ** -0.5   # the official code scales by C/G, not the per-group C/(2G)
        self.weight_query = _conv_bn(dim, dim // 2)
        self.weight_key = _conv_bn(key_dim, dim // 2)
        self.weight_proj = nn.Linear(_REGIONS * _REGIONS, smk_size ** 2 + kernel_size ** 2)
        self.rpb1 = nn.Parameter(torch.zeros(self.groups, 2 * smk_size - 1, 2 * smk_size - 1))
        self.rpb2 = nn.Parameter(torch.zeros(self.groups, 2 * kernel_size - 1, 2 * kernel_size - 1))
        if rpb_std > 0:
            nn.init.trunc_normal_(self.rpb1, std=rpb_std)
            nn.init.trunc_normal_(self.rpb2, std=rpb_std)
        self.dyconv_proj = _conv_bn(dim, dim)
        self._layouts: dict[tuple[int, int, int], BlockLayout] = {}

    def _layout(self, h: int, w: int, k: int) -> BlockLayout:
        if (h, w, k) not in self._layouts:
            self._layouts[h, w, k] = neighborhood((h, w), window=k)
        return self._layouts[h, w, k]

    def kernel_logits(self, query: Tensor, key_src: Tensor) -> tuple[Tensor, Tensor]:
        """Dynamic-kernel logits `[B, G, H, W, s^2]` and `[B, G, H, W, k^2]` (before the position bias)."""
        b, _, h, w = query.shape
        q = (self.weight_query(query) * self.scale).reshape(b, self.groups, -1, h * w)
        kk = self.weight_key(F.adaptive_avg_pool2d(key_src, _REGIONS)).reshape(b, self.groups, -1, _REGIONS ** 2)
        affinity = q.transpose(-1, -2) @ kk                                           # [B, G, HW, 49]
        logits = self.weight_proj(affinity).reshape(b, self.groups, h, w, -1)
        return logits.split([self.smk_size ** 2, self.kernel_size ** 2], dim=-1)

    def forward(self, query: Tensor, key_src: Tensor, values: Tensor) -> Tensor:
        check_image("query", query, self.dim)
        check_image("key_src", key_src, self.key_dim)
        check_image("values", values, self.dim)
        check_same_device_dtype(self, "query", query)
        if key_src.shape[2:] != query.shape[2:] or values.shape[2:] != query.shape[2:]:
            raise ValueError("query, key_src and values must share H x W")
        size = query.shape[2:]
        h, w = size
        if min(h, w) < self.kernel_size:
            k = self.kernel_size
            new = (k, int(k / h * w)) if h < w else (int(k / w * h), k)
            query, key_src, values = (F.interpolate(t, size=new, mode="bilinear", align_corners=False)
                                      for t in (query, key_src, values))
            h, w = new
        logits1, logits2 = self.kernel_logits(query, key_src)
        b = query.shape[0]
        v = values.reshape(b, 2, self.groups, -1, h, w).permute(1, 0, 2, 4, 5, 3)  # [2, B, G, H, W, c]
        out1 = contmix_aggregate(logits1, v[0], self.smk_size, self.rpb1, layout=self._layout(h, w, self.smk_size),
                                 backend=self.backend)
        out2 = contmix_aggregate(logits2, v[1], self.kernel_size, self.rpb2,
                                 layout=self._layout(h, w, self.kernel_size), backend=self.backend)
        out = torch.stack([out1, out2]).permute(1, 0, 2, 5, 3, 4).reshape(b, self.dim, h, w)
        if (h, w) != tuple(size):
            out = F.adaptive_avg_pool2d(out, size)
        return self.dyconv_proj(out)


class _LayerNorm2d(nn.LayerNorm):
    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ResDWConv(nn.Conv2d):
    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class _GRN(nn.Module):
    """ConvNeXt-V2 global response normalisation (gamma = beta = 0 at init: the identity)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        gx = torch.linalg.vector_norm(x, dim=(-1, -2), keepdim=True)
        return (self.gamma * (gx / (gx.mean(dim=1, keepdim=True) + 1e-6)) + 1) * x + self.beta


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1, dim, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight + self.bias


class _SE(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        inner = max(16, dim // 8)
        self.proj = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, inner, 1), nn.GELU(),
                                  nn.Conv2d(inner, dim, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.proj(x)


def _scale(dim, ls_init_value):
    return nn.Identity() if ls_init_value is None else _LayerScale(dim, ls_init_value)


def _mlp(dim: int, out_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), _ResDWConv(hidden), _GRN(hidden),
                         nn.Conv2d(hidden, out_dim, 1))


def _check_numbers(mlp_ratio, ls_init_value):
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    if ls_init_value is not None and (isinstance(ls_init_value, bool) or not isinstance(ls_init_value, (int, float))):
        raise ValueError(f"ls_init_value must be a number or None, got {ls_init_value!r}")


class ContMixBlock(nn.Module):
    """The plug-and-play ContMix block over `[B, dim, H, W]` (see the module docstring)."""

    def __init__(self, dim: int, *, kernel_size: int = 7, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 4.0, ls_init_value: float | None = None, res_scale: bool = False,
                 backend: str = "auto"):
        super().__init__()
        _check_numbers(mlp_ratio, ls_init_value)
        self.dim, self.res_scale = dim, bool(res_scale)
        self.contmix = ContMix(dim, kernel_size=kernel_size, smk_size=smk_size, num_heads=num_heads, backend=backend)
        self.dwconv1, self.norm1 = _ResDWConv(dim), _LayerNorm2d(dim)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.lepe = nn.Sequential(nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim),
                                  nn.BatchNorm2d(dim))
        self.value = _conv_bn(dim, dim)
        self.se = _SE(dim)
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, dim, 1))
        self.dwconv2, self.norm2 = _ResDWConv(dim), _LayerNorm2d(dim)
        self.mlp = _mlp(dim, dim, int(dim * mlp_ratio))
        self.ls1, self.ls2 = _scale(dim, ls_init_value), _scale(dim, ls_init_value)

    def _residual(self, identity, branch, ls):
        return ls(identity) + branch if self.res_scale else identity + ls(branch)

    def forward(self, x: Tensor) -> Tensor:
        check_image("x", x, self.dim)
        x = self.dwconv1(x)
        xn = self.norm1(x)
        mixed = self.contmix(xn, xn, self.value(xn)) + self.lepe(xn)
        x = self._residual(x, self.proj(self.gate(xn) * self.se(mixed)), self.ls1)
        x = self.dwconv2(x)
        return self._residual(x, self.mlp(self.norm2(x)), self.ls2)


class DynamicConvBlock(nn.Module):
    """OverLoCK's Focus-Net block: `forward(x [B, dim, H, W], h [B, ctx_dim, H, W], h_r [B, ctx_dim, H, W])`
    returns the updated `(x, h)` (or `(concat[x, h], None)` when `is_last`). `ctx_dim` is the context
    width C_h (C4 / 4 in OverLoCK; the official constructor takes C4 and divides by 4)."""

    def __init__(self, dim: int, ctx_dim: int, *, kernel_size: int = 7, smk_size: int = 5, num_heads: int = 2,
                 mlp_ratio: float = 4.0, ls_init_value: float | None = None, res_scale: bool = False,
                 is_first: bool = False, is_last: bool = False, backend: str = "auto"):
        super().__init__()
        _check_numbers(mlp_ratio, ls_init_value)
        check_positive_int("ctx_dim", ctx_dim)
        out_dim = dim + ctx_dim
        self.dim, self.ctx_dim, self.res_scale = dim, ctx_dim, bool(res_scale)
        self.is_first, self.is_last = bool(is_first), bool(is_last)
        if not self.is_first:
            self.x_scale, self.h_scale = _LayerScale(ctx_dim, 1.0), _LayerScale(ctx_dim, 1.0)
        self.dwconv1, self.norm1 = _ResDWConv(out_dim), _LayerNorm2d(out_dim)
        self.fusion = nn.Sequential(nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim), nn.BatchNorm2d(out_dim),
                                    nn.GELU(), nn.Conv2d(out_dim, dim, 1), _GRN(dim))
        self.contmix = ContMix(dim, ctx_dim, kernel_size=kernel_size, smk_size=smk_size, num_heads=num_heads,
                               rpb_std=0.0, backend=backend)
        self.lepe = nn.Sequential(nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim),
                                  nn.BatchNorm2d(dim))
        self.se = _SE(dim)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))
        self.dwconv2, self.norm2 = _ResDWConv(out_dim), _LayerNorm2d(out_dim)
        self.mlp = _mlp(out_dim, out_dim, int(dim * mlp_ratio))
        self.ls1, self.ls2 = _scale(out_dim, ls_init_value), _scale(out_dim, ls_init_value)

    def _residual(self, identity, branch, ls):
        return ls(identity) + branch if self.res_scale else identity + ls(branch)

    def forward(self, x: Tensor, h: Tensor, h_r: Tensor) -> tuple[Tensor, Tensor | None]:
        check_image("x", x, self.dim)
        check_image("h", h, self.ctx_dim)
        check_image("h_r", h_r, self.ctx_dim)
        if h.shape[2:] != x.shape[2:] or h_r.shape[2:] != x.shape[2:] or h.shape[0] != x.shape[0]:
            raise ValueError(f"h and h_r must match x's batch and H x W {list(x.shape[2:])}, "
                             f"got {list(h.shape)} and {list(h_r.shape)}")
        if not self.is_first:
            h = self.x_scale(h) + self.h_scale(h_r)
        x_f = self.dwconv1(torch.cat([x, h], dim=1))
        identity = x_f
        x_f = self.norm1(x_f)
        x = self.fusion(x_f)
        query, key_src = x_f.split([self.dim, self.ctx_dim], dim=1)
        mixed = self.contmix(query, key_src, x) + self.lepe(x)
        out = self._residual(identity, self.proj(self.gate(x) * self.se(mixed)), self.ls1)
        out = self.dwconv2(out)
        out = self._residual(out, self.mlp(self.norm2(out)), self.ls2)
        if self.is_last:
            return out, None
        x, h = out.split([self.dim, self.ctx_dim], dim=1)
        return x, h
