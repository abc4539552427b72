"""Pointer Networks on the paper's sorting-style task, scaled down to this CPU.

Task: n numbers drawn uniformly from [0, 1); the output is the permutation that sorts them
(the decoder points at the smallest remaining number each step). One model is trained on
n drawn from [5, 15] per batch, then tested on n = 5, 10, 15, 20, 30 (20 and 30 are longer than any
training sequence). Reported: per-position accuracy and whole-sequence accuracy (exact match).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/blocks_pointer.py [--steps 2000] [--hidden 128]
"""
from __future__ import annotations

import argparse
import time

import torch

from blockattn.modules import PointerNetwork


def batch(size, n, generator):
    x = torch.rand(size, n, 1, generator=generator)
    return x, x[..., 0].argsort(dim=1)


def evaluate(model, n, generator, samples=1000):
    x, y = batch(samples, n, generator)
    pred = model.decode(x)
    return (pred == y).float().mean().item(), (pred == y).all(1).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-n", type=int, nargs=2, default=(5, 15))
    parser.add_argument("--test-n", type=int, nargs="+", default=(5, 10, 15, 20, 30))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = PointerNetwork(1, args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = time.time()
    for step in range(1, args.steps + 1):
        n = int(torch.randint(args.train_n[0], args.train_n[1] + 1, (1,), generator=gen))
        x, y = batch(args.batch, n, gen)
        logits = model(x, y)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f} s", flush=True)
    train_s = time.time() - start
    model.eval()
    eval_gen = torch.Generator().manual_seed(1234)
    print(f"\ntrained {args.steps} steps (batch {args.batch}, n in [{args.train_n[0]}, {args.train_n[1]}], "
          f"hidden {args.hidden}) in {train_s:.0f} s\n")
    print("| n | trained on | position accuracy | sequence accuracy |")
    print("|---|---|---|---|")
    for n in args.test_n:
        pos, seq = evaluate(model, n, eval_gen)
        seen = "yes" if args.train_n[0] <= n <= args.train_n[1] else "no (longer)"
        print(f"| {n} | {seen} | {pos:.3f} | {seq:.3f} |")


if __name__ == "__main__":
    main()
