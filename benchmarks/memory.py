"""Memory of one attention call at long length: peak resident-memory growth over q, k, v and out.

    python benchmarks/memory.py --length 65536 --density 0.05

The inputs and the output buffer are allocated before measuring, so the growth is what the call
itself adds (layout metadata, per-thread scratch, lse). Sampled RSS: see blockattn.bench.timing.
"""
import argparse

import torch

import blockattn
from blockattn.bench.timing import peak_rss_growth


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--density", type=float, default=0.05, help="fraction of the causal tiles kept")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args()
    L, H, D = args.length, args.heads, args.dim
    layout = blockattn.patterns.random_blocks(L, density=args.density, heads=H)
    q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
    blockattn.attention(q[:, :, :128], k[:, :, :128], v[:, :, :128], blockattn.patterns.causal(128),
                        backend=args.backend)  # warm up allocator and threads
    out, grown = peak_rss_growth(lambda: blockattn.attention(q, k, v, layout, backend=args.backend))
    inputs = 4 * q.numel() * 4
    print(f"L={L} H={H} D={D} density {layout.density():.3f} of all tiles ({args.density} of causal), "
          f"backend {args.backend}")
    print(f"q+k+v+out = {inputs / 2**20:.0f} MiB; peak RSS growth during the call = {grown / 2**20:.0f} MiB "
          f"(includes out's {q.numel() * 4 / 2**20:.0f} MiB); an L x L fp32 matrix per head would be "
          f"{L * L * 4 / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
