"""Lightning Attention (blocked CPU path) vs softmax attention through the engine, forward, over length.

Prints time per length, the ratio time(L) / time(smallest L) for each (linear scaling keeps
Lightning's ratio near L / L_min; softmax grows ~ (L / L_min)²), and Lightning's speedup over
softmax at each length, all timed in the same run. Timings are min-of-repeats on a shared machine
and are noisy. Usage:

    .venv/bin/python benchmarks/lightning_scaling.py --lengths 4096 8192 16384 32768 --plot docs/bench/lightning_scaling.png
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import blockattn
from blockattn.bench.timing import time_call
from blockattn.linear import lightning_attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--max-softmax-len", type=int, default=16384, help="skip softmax above this length")
    parser.add_argument("--softmax-backend", default="auto", help="engine backend for the softmax baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    parser.add_argument("--plot", default="", help="PNG of time vs length ('' = none)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for length in tqdm(args.lengths, desc="lengths"):
        q, k, v = (torch.randn(1, args.heads, length, args.head_dim) * 0.1 for _ in range(3))
        decay = torch.linspace(0.9, 0.999, args.heads)
        light = time_call(lambda: lightning_attention(q, k, v, decay, block_size=args.block_size), repeats=args.repeats)
        soft = None
        if length <= args.max_softmax_len:
            layout = blockattn.patterns.causal(length)
            soft = time_call(lambda: blockattn.attention(q, k, v, layout, backend=args.softmax_backend), repeats=args.repeats)
        rows.append((length, light, soft))
    base_light, base_soft = rows[0][1], rows[0][2]
    backend = blockattn.ops.dispatch.choose(torch.device("cpu")) if args.softmax_backend == "auto" else args.softmax_backend
    print(f"B=1 H={args.heads} D={args.head_dim} block={args.block_size} fp32, forward, min of {args.repeats}; "
          f"softmax backend: {backend}")
    print("| L | Lightning ms | Lightning t(L)/t(L0) | softmax ms | softmax t(L)/t(L0) | softmax / Lightning |")
    print("|---|---|---|---|---|---|")
    for length, light, soft in rows:
        s = "—" if soft is None else f"{soft:.1f}"
        sr = "—" if soft is None or base_soft is None else f"{soft / base_soft:.2f}"
        sp = "—" if soft is None else f"{soft / light:.1f}"
        print(f"| {length} | {light:.1f} | {light / base_light:.2f} | {s} | {sr} | {sp} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="Lightning (blocked CPU)")
        soft_rows = [r for r in rows if r[2] is not None]
        ax.plot([r[0] for r in soft_rows], [r[2] for r in soft_rows], marker="s", label="softmax (engine, causal)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("forward ms")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
