"""Entropy-model context over decoded channel slices (the S2LIC-inspired `SliceEntropyContext`): bits to
code the last slice of a latent, against the same coder without context and with a convolutional context.

Latents are generated: `r` smooth random fields (Gaussian noise blurred by a box filter) mixed into
`slices x S` channels by a fixed random matrix, plus noise, scaled to a standard deviation of ~3 and
rounded (unit quantisation bins, as a learned codec's latent). The coder predicts the last slice's
(mean, scale) from the slices before it and pays `-log2` of the discretised Gaussian likelihood:
- `none`: one learned (mean, scale) per channel (a factorised prior: no context);
- `conv`: three 3x3 convolutions over the decoded slices (local context, about as many parameters);
- `attention`: `SliceEntropyContext` (channel-wise + global spatial attention through the engine).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/blocks_slice_context.py [--steps 400] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from blockattn.modules.slice_context import SliceEntropyContext, gaussian_bits


def make_latents(count: int, *, slices: int, s: int, size: int, fields: int, generator: torch.Generator):
    z = torch.randn(count, fields, size, size, generator=generator)
    z = F.avg_pool2d(F.pad(z, (3, 3, 3, 3), mode="circular"), 7, stride=1)  # smooth: wide spatial context
    mix = torch.randn(slices * s, fields, generator=torch.Generator().manual_seed(7))
    y = torch.einsum("cf,bfhw->bchw", mix, z)
    y = y / y.std() * 3.0 + 0.3 * torch.randn(y.shape, generator=generator)
    return torch.round(y)


class NoContext(nn.Module):
    def __init__(self, s: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, s, 1, 1))
        self.raw_scale = nn.Parameter(torch.ones(1, s, 1, 1))

    def forward(self, decoded):
        shape = (decoded.shape[0], self.mean.shape[1], *decoded.shape[2:])
        return self.mean.expand(shape), (F.softplus(self.raw_scale) + 0.11).expand(shape)


class ConvContext(nn.Module):
    def __init__(self, channels: int, s: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(hidden, 2 * s, 3, padding=1))

    def forward(self, decoded):
        mean, scale = self.net(decoded).chunk(2, dim=1)
        return mean, F.softplus(scale) + 0.11


def train(kind, data, *, slices, s, steps, batch, seed):
    torch.manual_seed(seed)
    context = slices - 1
    model = {"none": lambda: NoContext(s), "conv": lambda: ConvContext(context * s, s),
             "attention": lambda: SliceEntropyContext(s, context, hidden=64, dim=32, heads=2)}[kind]()
    train_y, test_y = data
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(train_y), (batch,))
        y = train_y[idx]
        mean, scale = model(y[:, :context * s])
        loss = gaussian_bits(y[:, context * s:], mean, scale) / y[:, context * s:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        mean, scale = model(test_y[:, :context * s])
        bits = float(gaussian_bits(test_y[:, context * s:], mean, scale)) / test_y[:, context * s:].numel()
    return bits, sum(p.numel() for p in model.parameters()), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["none", "conv", "attention"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--slice-channels", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(2026)
    shape = dict(slices=args.slices, s=args.slice_channels, size=args.size, fields=6)
    data = make_latents(512, generator=gen, **shape), make_latents(128, generator=gen, **shape)
    print(f"latents {args.slices} slices x {args.slice_channels} channels, {args.size}x{args.size}; coding the last "
          f"slice from the {args.slices - 1} before it; {args.steps} Adam steps, batch {args.batch}, seeds {args.seeds}\n")
    print("| context | bits per element (test, mean) | per seed | params | train s / seed |")
    print("|---|---|---|---|---|")
    for kind in args.kinds:
        runs = [train(kind, data, slices=args.slices, s=args.slice_channels, steps=args.steps, batch=args.batch,
                      seed=seed) for seed in args.seeds]
        bits = [r[0] for r in runs]
        print(f"| {kind} | {sum(bits) / len(bits):.3f} | {' / '.join(f'{b:.3f}' for b in bits)} | {runs[0][1]:,} | "
              f"{sum(r[2] for r in runs) / len(runs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
