"""SSL-UVOS attention clustering on generated moving-shape videos: masks without knowing the object count.

No DINO backbone is available here, so the frozen per-patch features are generated: each video
(T = 20 frames of 16 x 16 patches) has a textured background and two objects (a square and a
disc) moving on straight lines; every patch's 32-d feature is its region's prototype (random per
video) plus Gaussian noise of std `noise`. The spatio-temporal block is not trained: its query
and key projections are tied (W_k = W_q, scaled by `sharpness`), so attention follows feature
similarity, which is what the paper's training teaches the block. Each pixel attends to the pixels
of every 10th frame (`key_frame_attention`, ratio 10), and `hierarchical_cluster` (tau 1.0) turns
the attention distributions into masks. Reported: mean IoU of each ground-truth region (two objects
and the background) with its best-matching cluster, the number of clusters found, over 5 videos.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/blocks_uvos.py
"""
from __future__ import annotations

import argparse
import time

import torch

from blockattn.modules import SpatioTemporalBlock, hierarchical_cluster

T, S, D = 20, 16, 32


def video(noise: float, generator: torch.Generator):
    yy, xx = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")
    labels = torch.zeros(T, S, S, dtype=torch.long)
    start = torch.rand(2, 2, generator=generator) * (S - 6) + 3
    velocity = (torch.rand(2, 2, generator=generator) - 0.5) * 0.5
    for t in range(T):
        c = start + velocity * t
        square = ((yy - c[0, 0]).abs() <= 2.5) & ((xx - c[0, 1]).abs() <= 2.5)
        disc = (yy - c[1, 0]) ** 2 + (xx - c[1, 1]) ** 2 <= 2.6 ** 2
        labels[t][square] = 1
        labels[t][disc & ~square] = 2
    prototypes = torch.randn(3, D, generator=generator)
    texture = 0.5 * torch.randn(S, S, D, generator=generator)            # static background texture
    feats = prototypes[labels] + noise * torch.randn(T, S, S, D, generator=generator)
    feats = feats + (labels == 0)[..., None] * texture
    return feats.reshape(T, S * S, D), labels.reshape(T, S * S)


def mean_iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    ious = []
    for region in truth.unique():
        gt = truth == region
        best = max(((pred == c) & gt).sum().item() / ((pred == c) | gt).sum().item() for c in pred.unique())
        ious.append(best)
    return sum(ious) / len(ious)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--videos", type=int, default=5)
    parser.add_argument("--sharpness", type=float, default=2.5)
    parser.add_argument("--tau", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    block = SpatioTemporalBlock(D, 4).eval()
    with torch.no_grad():
        # tie keys to queries: q . k becomes a similarity of the normalised features
        block.qkv.weight[D:2 * D] = block.qkv.weight[:D]
        block.qkv.weight[:2 * D] *= args.sharpness
    print(f"{args.videos} videos of {T} frames x {S}x{S} patches, key frames every 10th, tau {args.tau}\n")
    print("| feature noise | mean IoU (objects + background) | clusters found (3 regions) | s / video |")
    print("|---|---|---|---|")
    gen = torch.Generator().manual_seed(7)
    for noise in args.noise:
        ious, counts, start = [], [], time.time()
        for _ in range(args.videos):
            feats, truth = video(noise, gen)
            with torch.no_grad():
                attention = block.key_frame_attention(feats, ratio=10)
                labels = hierarchical_cluster(attention, tau=args.tau)
            ious.append(mean_iou(labels, truth))
            counts.append(int(labels.max()) + 1)
        print(f"| {noise} | {sum(ious) / len(ious):.3f} | {' '.join(map(str, counts))} | "
              f"{(time.time() - start) / args.videos:.1f} |", flush=True)


if __name__ == "__main__":
    main()
