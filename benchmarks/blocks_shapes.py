"""Vision attention blocks on a generated-shapes classifier, each against the same backbone without it.

sklearn (for its bundled digits) is not installed in this environment, so the images are
generated: 24 x 24 grey images of one of 6 shapes (disc, square, triangle, plus, ring, hollow
square) at a random position and size, with Gaussian noise and random clutter strokes. The
backbone is a small ConvNet:

    stem 3x3/2 (1 -> 32) -> [block A @ 12x12] -> 3x3/2 (32 -> 64) -> [block B @ 6x6] -> GAP -> linear

`none` leaves both block slots empty (the backbone alone); `conv` puts a plain residual
two-conv block in both (`conv1`: one conv), controls with extra depth but no attention; every other variant puts
its paper's block in both slots (`overlock-topdown` rewires the net as OverLoCK's overview and
focus stages, see `TopDown`). Reported: test accuracy (mean over seeds), parameters, train time.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/blocks_shapes.py [--blocks none psa ...] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from blockattn.modules import (ContMixBlock, DynamicConvBlock, LaMambaBlock, NiNBlock, PATBlock,
                               PolarizedSelfAttention)

SIZE, CLASSES = 24, 6


def make_shapes(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    images = torch.zeros(count, 1, SIZE, SIZE)
    for i in range(count):
        r = 3.5 + 3.0 * torch.rand((), generator=generator).item()
        cy, cx = (r + 1 + (SIZE - 2 * r - 2) * torch.rand(2, generator=generator)).tolist()
        dy, dx = yy - cy, xx - cx
        kind = labels[i].item()
        if kind == 0:
            mask = dy ** 2 + dx ** 2 <= r ** 2
        elif kind == 1:
            mask = (dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85)
        elif kind == 2:
            mask = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
        elif kind == 3:
            mask = ((dy.abs() <= r) & (dx.abs() <= r * 0.3)) | ((dx.abs() <= r) & (dy.abs() <= r * 0.3))
        elif kind == 4:
            d = (dy ** 2 + dx ** 2).sqrt()
            mask = (d <= r) & (d >= r * 0.55)
        else:
            inner = (dy.abs() <= r * 0.45) & (dx.abs() <= r * 0.45)
            mask = (dy.abs() <= r * 0.85) & (dx.abs() <= r * 0.85) & ~inner
        img = mask.float()
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):   # clutter strokes
            y0, x0 = torch.randint(0, SIZE, (2,), generator=generator).tolist()
            horizontal = bool(torch.randint(0, 2, (1,), generator=generator))
            length = int(torch.randint(3, 8, (1,), generator=generator))
            if horizontal:
                img[y0, x0:x0 + length] = 1.0
            else:
                img[y0:y0 + length, x0] = 1.0
        images[i, 0] = img
    images += 0.35 * torch.randn(images.shape, generator=generator)
    return images, labels


class _Tokens(nn.Module):
    """NiNformer works on token sequences: `[B, C, H, W]` <-> `[B, HW, C]` around the block."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.block = NiNBlock(channels, 2 * channels, size * size)

    def forward(self, x):
        b, c, h, w = x.shape
        return self.block(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class _LaMamba(nn.Module):
    """LaMamba-Diff's block (selective scan + window attention + MLP, adaLN-Zero) on a classifier: no
    timestep or class to condition on, so its condition is one learned vector (the adaLN biases then act
    as learned, unconditional shift / scale / gates); 4x4 windows at 12x12, the whole map at 6x6 (the
    paper: the window is the map when the map is at most the window)."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.block = LaMambaBlock(channels, heads=2, cond_dim=16, window=4 if size > 8 else size)
        self.condition = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        c = self.condition.expand(x.shape[0], -1)
        return self.block(x.permute(0, 2, 3, 1), c).permute(0, 3, 1, 2)


class _ResidualConv(nn.Module):
    def __init__(self, channels: int, convs: int = 2):
        super().__init__()
        layers = [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)]
        if convs == 2:
            layers += [nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


def make_block(kind: str, channels: int, size: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "conv":   # a plain residual conv block: the "extra depth, no attention" control
        return _ResidualConv(channels)
    if kind == "conv1":  # the same with one conv: a control the size of the PSA / PAT variants
        return _ResidualConv(channels, convs=1)
    if kind == "psa":
        return PolarizedSelfAttention(channels, layout="parallel", form="paper")
    if kind == "psa-seq":
        return PolarizedSelfAttention(channels, layout="sequential", form="official")
    if kind == "pat":
        return PATBlock(channels, spatial_attn=True)
    if kind == "pat-sf":
        return PATBlock(channels, mixer="sf") if size <= 6 else PATBlock(channels)
    if kind == "ninformer":
        return _Tokens(channels, size)
    if kind == "overlock":
        return ContMixBlock(channels, kernel_size=5 if size <= 6 else 7, smk_size=3, num_heads=2,
                            ls_init_value=1.0, res_scale=True)
    if kind == "lamamba":
        return _LaMamba(channels, size)
    raise ValueError(f"unknown block {kind!r}")


class Backbone(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.GELU())
        self.block_a = make_block(kind, 32, 12)
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.GELU())
        self.block_b = make_block(kind, 64, 6)
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x):
        x = self.block_b(self.down(self.block_a(self.stem(x))))
        return self.head(x.mean((2, 3)))


class TopDown(nn.Module):
    """OverLoCK's overview-first, look-closely-next wiring at toy scale: the 6x6 stage is the
    overview; its 1x1-projected context (16 channels) is upsampled to 12x12 and steers a
    DynamicConvBlock on the 12x12 features, whose output (features + context) feeds the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.GELU())
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.GELU())
        self.prior = nn.Conv2d(64, 16, 1)
        self.focus = DynamicConvBlock(32, 16, kernel_size=7, smk_size=3, num_heads=2, ls_init_value=1.0,
                                      res_scale=True, is_first=True, is_last=True)
        self.head = nn.Linear(48, CLASSES)
        self.aux = nn.Linear(64, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        ctx = self.down(x)
        prior = F.interpolate(self.prior(ctx), size=x.shape[2:], mode="bilinear", align_corners=False)
        merged, _ = self.focus(x, prior, prior)
        logits = self.head(merged.mean((2, 3)))
        return (logits, self.aux(ctx.mean((2, 3)))) if self.training else logits


def train(kind, data, seed, epochs, batch):
    torch.manual_seed(seed)
    model = TopDown() if kind == "overlock-topdown" else Backbone(kind)
    (x_train, y_train), (x_test, y_test) = data
    steps = epochs * math.ceil(len(x_train) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    start = time.time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(x_train), batch):
            idx = perm[i:i + batch]
            out = model(x_train[idx])
            if isinstance(out, tuple):   # OverLoCK's auxiliary overview loss, weight 0.4
                loss = F.cross_entropy(out[0], y_train[idx]) + 0.4 * F.cross_entropy(out[1], y_train[idx])
            else:
                loss = F.cross_entropy(out, y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.time() - start
    model.eval()
    with torch.no_grad():
        accuracy = torch.cat([model(x_test[i:i + 500]).argmax(1) for i in range(0, len(x_test), 500)])
        accuracy = (accuracy == y_test).float().mean().item()
    return accuracy, sum(p.numel() for p in model.parameters()), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", nargs="+", default=["none", "conv", "conv1", "psa", "psa-seq", "pat", "pat-sf",
                                                        "ninformer", "overlock", "overlock-topdown", "lamamba"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(2026)
    data = make_shapes(args.train, gen), make_shapes(args.test, gen)
    print(f"{args.train} train / {args.test} test images, {args.epochs} epochs, seeds {args.seeds}\n")
    print("| block | test accuracy (mean) | per seed | params | train s / seed |")
    print("|---|---|---|---|---|")
    for kind in args.blocks:
        runs = [train(kind, data, seed, args.epochs, args.batch) for seed in args.seeds]
        accs = [r[0] for r in runs]
        print(f"| {kind} | {sum(accs) / len(accs):.3f} | {' / '.join(f'{a:.3f}' for a in accs)} | {runs[0][1]:,} | "
              f"{sum(r[2] for r in runs) / len(runs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
