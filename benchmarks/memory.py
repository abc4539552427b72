"""Memory of one attention call at long length: peak resident-memory growth over q, k, v and out.

    python benchmarks/memory.py --length 65536 --density 0.05
    python benchmarks/memory.py --backward --length 32768 --density 1 --threads 1 8   # fwd+bwd, full causal

With --backward, forward+backward is measured once per thread count and compared with the size of
dq+dk+dv (the gradients the call must return): a backward with per-thread copies of dq would grow with
the thread count, one with an owner per row does not.

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
    parser.add_argument("--backward", action="store_true", help="measure forward+backward")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (--backward)")
    args = parser.parse_args()
    if args.backward:
        return backward_memory(args)
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


def backward_memory(args):
    L, H, D = args.length, args.heads, args.dim
    layout = (blockattn.patterns.causal(L) if args.density >= 1 else
              blockattn.patterns.random_blocks(L, density=args.density, heads=H))
    q, k, v = (torch.randn(1, H, L, D, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, H, L, D)
    grads_bytes = 3 * q.numel() * 4
    print(f"L={L} H={H} D={D} density {layout.density():.3f}, backend {args.backend}, fwd+bwd; "
          f"q+k+v = {grads_bytes / 2**20:.0f} MiB, dq+dk+dv = {grads_bytes / 2**20:.0f} MiB")
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        small = [t[:, :, :128].detach().requires_grad_(True) for t in (q, k, v)]
        out = blockattn.attention(*small, blockattn.patterns.causal(128), backend=args.backend)
        torch.autograd.grad(out, small, torch.ones_like(out))  # warm up allocator and threads

        def step():
            out = blockattn.attention(q, k, v, layout, backend=args.backend)
            return torch.autograd.grad(out, (q, k, v), grad)

        _, grown = peak_rss_growth(step)
        print(f"threads {threads}: peak RSS growth during fwd+bwd = {grown / 2**20:.0f} MiB = "
              f"{grown / grads_bytes:.2f} x dq+dk+dv (bar < 1.5)", flush=True)


if __name__ == "__main__":
    main()
