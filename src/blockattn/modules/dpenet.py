"""DPENet's blocks for rain removal: DDRB (dilated dense residual) and ERPAB (pixel-wise attention).

Wen, Gao, Zhang, Zhang, Chen, "From heavy rain removal to detail restoration: A faster and
better network" (DPENet, Pattern Recognition 2024, arXiv 2205.03553); official code
chdwyb/DPENet (`NetModel.py`). Inputs `[B, C, H, W]`, C = 32; all 3x3 convs bias-free with
padding = dilation, so every map keeps its H x W.

- `DDRB` (dilations 1, 1, 2, 2, 5, 5): `x1 = c1b(relu(c1a(x)))`, `x2 = c2b(relu(c2a(relu(x + x1))))`,
  `x3 = c5b(relu(c5a(relu(x + x1 + x2))))`, `out = relu(x + x1 + x2 + x3)`. 55,296 parameters.
- `ERPAB`: three parallel 3x3 convs with dilations 1, 2, 5, concatenated, 1x1 (3C -> C, bias) +
  ReLU gives f; pixel attention `a = sigmoid(conv3x3(C/r -> C)(relu(conv3x3(C -> C/r)(f))))` with
  r = 32 (a one-channel bottleneck at C = 32; never below one channel); `out = relu(f * a + x)`. 31,328 parameters.
- `DPENet`: R2Net (1x1 3 -> 32 + ReLU, 10 DDRBs, 1x1 32 -> 3 + ReLU, plus the input) then DRNet
  (1x1 3 -> 32 + ReLU on relu(x_mid), 3 ERPABs, 1x1 32 -> 3 + ReLU, plus x_mid); returns
  `(x_mid, out)`. 647,328 parameters (`LightDPENet` in the paper: 5 DDRBs).
The attention here is a per-pixel sigmoid gate, plain PyTorch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from blockattn.modules._block_checks import check_image, check_positive_int, check_same_device_dtype

__all__ = ["DDRB", "ERPAB", "DPENet"]


def _conv(channels_in: int, channels_out: int, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, padding=dilation, dilation=dilation, bias=False)


class DDRB(nn.Module):
    """Dilated dense residual block over `[B, channels, H, W]`."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.convs = nn.ModuleList(_conv(channels, channels, d) for d in (1, 1, 2, 2, 5, 5))

    def forward(self, x: Tensor) -> Tensor:
        check_image("x", x, self.channels)
        c = self.convs
        x1 = c[1](torch.relu(c[0](x)))
        x2 = c[3](torch.relu(c[2](torch.relu(x + x1))))
        x3 = c[5](torch.relu(c[4](torch.relu(x + x1 + x2))))
        return torch.relu(x + x1 + x2 + x3)


class ERPAB(nn.Module):
    """Enhanced residual pixel-wise attention block over `[B, channels, H, W]`."""

    def __init__(self, channels: int = 32, reduction: int = 32):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        hidden = max(1, channels // check_positive_int("reduction", reduction))
        self.branches = nn.ModuleList(_conv(channels, channels, d) for d in (1, 2, 5))
        self.merge = nn.Conv2d(3 * channels, channels, 1)
        self.attention = nn.Sequential(_conv(channels, hidden), nn.ReLU(), _conv(hidden, channels),
                                       nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        check_image("x", x, self.channels)
        f = torch.relu(self.merge(torch.cat([branch(x) for branch in self.branches], dim=1)))
        return torch.relu(f * self.attention(f) + x)


class DPENet(nn.Module):
    """Two-stage deraining network over RGB `[B, 3, H, W]`; returns `(x_mid, out)`."""

    def __init__(self, channels: int = 32, ddrbs: int = 10, erpabs: int = 3):
        super().__init__()
        check_positive_int("channels", channels)
        self.r2_in = nn.Conv2d(3, channels, 1, bias=False)
        self.r2_blocks = nn.Sequential(*(DDRB(channels) for _ in range(check_positive_int("ddrbs", ddrbs))))
        self.r2_out = nn.Conv2d(channels, 3, 1, bias=False)
        self.dr_in = nn.Conv2d(3, channels, 1, bias=False)
        self.dr_blocks = nn.Sequential(*(ERPAB(channels) for _ in range(check_positive_int("erpabs", erpabs))))
        self.dr_out = nn.Conv2d(channels, 3, 1, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image("x", x, 3)
        check_same_device_dtype(self, "x", x)
        x_mid = torch.relu(self.r2_out(self.r2_blocks(torch.relu(self.r2_in(x))))) + x
        out = torch.relu(self.dr_out(self.dr_blocks(torch.relu(self.dr_in(torch.relu(x_mid)))))) + x_mid
        return x_mid, out
