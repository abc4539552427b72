"""Gate-style blocks on generated tasks: DPENet's ERPAB on synthetic rain, EAB / SAB on toy grounding.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/blocks_gates.py derain
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/blocks_gates.py grounding

derain: 20 x 20 RGB images made of smooth random colour fields (a few low-frequency sinusoids)
with bright slanted rain streaks added. A restoration head (1x1 in, 3 blocks, 1x1 out, plus the
input, DPENet's DRNet wiring) with ERPAB blocks against the same head with plain residual conv
blocks (three 3x3 convs, 27,648 parameters against ERPAB's 31,328). Reported: test PSNR of the output
against the clean image (and of the rainy input).

grounding: 32 x 32 images holding three different shapes (of disc, square, plus, ring) in random
colours and places; the "sentence" is a 16-d embedding naming one of the four shapes (a fixed
random code per shape, plus noise). A small conv encoder's features are gated by EAB or by the
SAB reconstruction, then a 1x1 conv predicts the named shape's mask. Baseline: the embedding
broadcast and concatenated as extra channels. Reported: mean IoU of the thresholded mask.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from blockattn.modules import ERPAB, EmbeddingAttention, SentenceAttentionBlock

SIZE, RAIN_SIZE = 32, 20


# ------------------------------------------------------------------------------------------ derain
def rainy_images(count, generator):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, RAIN_SIZE), torch.linspace(0, 1, RAIN_SIZE), indexing="ij")
    clean = torch.zeros(count, 3, RAIN_SIZE, RAIN_SIZE)
    for _ in range(3):
        fy, fx = (torch.rand(2, count, 3, 1, 1, generator=generator) * 4)
        phase = torch.rand(count, 3, 1, 1, generator=generator) * 6.28
        clean += torch.sin(fy * 6.28 * yy + fx * 6.28 * xx + phase) / 3
    clean = 0.5 + 0.35 * clean
    rain = torch.zeros(count, 1, RAIN_SIZE, RAIN_SIZE)
    for i in range(count):
        for _ in range(int(torch.randint(4, 9, (1,), generator=generator))):
            y0, x0 = torch.randint(0, RAIN_SIZE, (2,), generator=generator).tolist()
            for s in range(int(torch.randint(4, 10, (1,), generator=generator))):
                y, x = y0 + s, x0 + s // 2
                if y < RAIN_SIZE and x < RAIN_SIZE:
                    rain[i, 0, y, x] = 0.6
    return (clean + rain).clamp(0, 1.2), clean


class _ResConv(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(3))

    def forward(self, x):
        return torch.relu(x + self.c(torch.relu(self.b(torch.relu(self.a(x))))))


class _DRNet(nn.Module):
    def __init__(self, block, channels=32):
        super().__init__()
        self.inp = nn.Conv2d(3, channels, 1, bias=False)
        self.blocks = nn.Sequential(*(block(channels) for _ in range(3)))
        self.out = nn.Conv2d(channels, 3, 1, bias=False)

    def forward(self, x):
        return self.out(self.blocks(torch.relu(self.inp(x)))) + x


def psnr(a, b):
    return (10 * torch.log10(1.0 / F.mse_loss(a, b, reduction="none").mean((1, 2, 3)))).mean().item()


def derain(args):
    gen = torch.Generator().manual_seed(1)
    x_train, y_train = rainy_images(1500, gen)
    x_test, y_test = rainy_images(300, gen)
    print(f"input PSNR (rainy vs clean): {psnr(x_test.clamp(0, 1), y_test):.2f} dB\n")
    print("| blocks | test PSNR (dB, mean) | per seed | params | train s / seed |")
    print("|---|---|---|---|---|")
    for name, block in (("ERPAB (pixel attention)", ERPAB), ("plain residual conv", _ResConv)):
        scores, seconds = [], 0.0
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = _DRNet(block)
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            steps = args.epochs * math.ceil(len(x_train) / 32)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            start = time.time()
            for _ in range(args.epochs):
                perm = torch.randperm(len(x_train))
                for i in range(0, len(x_train), 32):
                    idx = perm[i:i + 32]
                    loss = F.l1_loss(model(x_train[idx]), y_train[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
            seconds += time.time() - start
            with torch.no_grad():
                scores.append(psnr(model(x_test).clamp(0, 1), y_test))
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {sum(scores) / len(scores):.2f} | {' / '.join(f'{s:.2f}' for s in scores)} | "
              f"{params:,} | {seconds / len(args.seeds):.0f} |", flush=True)


# --------------------------------------------------------------------------------------- grounding
SHAPES, EMBED = 4, 16


def grounding_data(count, codes, generator):
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    images = torch.zeros(count, 3, SIZE, SIZE)
    masks = torch.zeros(count, 1, SIZE, SIZE)
    query = torch.zeros(count, dtype=torch.long)
    for i in range(count):
        kinds = torch.randperm(SHAPES, generator=generator)[:3]
        pick = int(torch.randint(0, 3, (1,), generator=generator))
        for j, kind in enumerate(kinds.tolist()):
            r = 4 + 2 * torch.rand((), generator=generator).item()
            cy, cx = (r + 1 + (SIZE - 2 * r - 2) * torch.rand(2, generator=generator)).tolist()
            dy, dx = yy - cy, xx - cx
            if kind == 0:
                m = dy ** 2 + dx ** 2 <= r ** 2
            elif kind == 1:
                m = (dy.abs() <= r * 0.8) & (dx.abs() <= r * 0.8)
            elif kind == 2:
                m = ((dy.abs() <= r) & (dx.abs() <= r * 0.3)) | ((dx.abs() <= r) & (dy.abs() <= r * 0.3))
            else:
                d = (dy ** 2 + dx ** 2).sqrt()
                m = (d <= r) & (d >= r * 0.55)
            colour = torch.rand(3, 1, 1, generator=generator) * 0.8 + 0.2
            images[i] = torch.where(m, colour, images[i])
            if j == pick:
                masks[i, 0] = m.float()
                query[i] = kind
    sentences = codes[query] + 0.1 * torch.randn(count, EMBED, generator=generator)
    images += 0.05 * torch.randn(images.shape, generator=generator)
    return images, sentences, masks


class _Grounder(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        extra = EMBED if kind == "concat" else 0
        self.enc = nn.Sequential(nn.Conv2d(3 + extra, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        if kind == "eab":
            self.gate = EmbeddingAttention(EMBED, 32)
        elif kind == "sab":
            self.gate = SentenceAttentionBlock(32, EMBED, reduction=4)
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1))

    def forward(self, image, sentence):
        if self.kind == "concat":
            image = torch.cat([image, sentence[:, :, None, None].expand(-1, -1, SIZE, SIZE)], 1)
        f = self.enc(image)
        if self.kind != "concat":
            f = self.gate(f, sentence)
            if self.kind == "eab":
                f = f * f.shape[1]   # EAB's softmax gate sums to 1 over C: rescale to unit mean
        return self.head(f)


def grounding(args):
    gen = torch.Generator().manual_seed(3)
    codes = torch.randn(SHAPES, EMBED, generator=gen)
    train = grounding_data(2000, codes, gen)
    test = grounding_data(500, codes, gen)
    print("| conditioning | test mask IoU (mean) | per seed | params | train s / seed |")
    print("|---|---|---|---|---|")
    for kind in ("eab", "sab", "concat"):
        scores, seconds = [], 0.0
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = _Grounder(kind)
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            start = time.time()
            for _ in range(args.epochs):
                model.train()
                perm = torch.randperm(len(train[0]))
                for i in range(0, len(perm), 32):
                    idx = perm[i:i + 32]
                    loss = F.binary_cross_entropy_with_logits(model(train[0][idx], train[1][idx]), train[2][idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            seconds += time.time() - start
            model.eval()
            with torch.no_grad():
                pred = model(test[0], test[1]) > 0
                truth = test[2] > 0.5
                iou = ((pred & truth).sum((1, 2, 3)) / (pred | truth).sum((1, 2, 3)).clamp(min=1)).mean().item()
            scores.append(iou)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {kind} | {sum(scores) / len(scores):.3f} | {' / '.join(f'{s:.3f}' for s in scores)} | "
              f"{params:,} | {seconds / len(args.seeds):.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=["derain", "grounding"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: 8 (derain), 5 (grounding)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.epochs is None:
        args.epochs = 8 if args.task == "derain" else 5
    derain(args) if args.task == "derain" else grounding(args)


if __name__ == "__main__":
    main()
