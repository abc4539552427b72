"""The compiled CPU kernel against SDPA and warm compiled FlexAttention, timed in the same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_engine.py --threads 2 --repeats 3 --png docs/bench/cpu.png

fp32, B=1, Hq=Hkv=8, D=64, block 64. Rows: full causal (forward, forward+backward) against
SDPA(is_causal=True); a random causal block layout (10% of the causal tiles, per-head different)
against SDPA causal and against compiled FlexAttention on the same layout (compile time excluded);
and the peak resident-memory growth of one call at L=65536, 5% density. Times are the minimum of
`--repeats` rounds in which the contenders run in turn (interleaved, so a burst of load from other
processes hits both sides of a ratio alike); the machine may be shared, so ratios are noisy.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import blockattn
from blockattn.bench.timing import peak_rss_growth


def interleaved_min(fns, repeats):
    """Minimum wall time in ms of each callable, after one warm-up call each, over `repeats` rounds."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def _inputs(L, heads, dim, grad=False):
    return [torch.randn(1, heads, L, dim, requires_grad=grad) for _ in range(3)]


def _fwd_bwd(fn, inputs):
    grad = torch.randn_like(inputs[0])

    def step():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad)
    return step


def causal_rows(L, heads, dim, repeats):
    q, k, v = _inputs(L, heads, dim)
    layout = blockattn.patterns.causal(L)
    with torch.no_grad():
        sdpa, cpu = interleaved_min([lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                     lambda: blockattn.attention(q, k, v, layout, backend="cpu")], repeats)
    yield f"causal L={L}", "forward", cpu, "SDPA causal", sdpa
    inputs = _inputs(L, heads, dim, grad=True)
    sdpa, cpu = interleaved_min(
        [_fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), inputs),
         _fwd_bwd(lambda q, k, v: blockattn.attention(q, k, v, layout, backend="cpu"), inputs)], repeats)
    yield f"causal L={L}", "fwd+bwd", cpu, "SDPA causal fwd+bwd", sdpa


def random_rows(L, heads, dim, repeats, flex):
    from blockattn.ops.flex import compiled_flex_attention, layout_to_block_mask

    q, k, v = _inputs(L, heads, dim)
    layout = blockattn.patterns.random_blocks(L, density=0.1, heads=heads)
    name = f"random 10% L={L}"
    fns = [lambda: blockattn.attention(q, k, v, layout, backend="cpu"),
           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)]
    if flex:
        block_mask = layout_to_block_mask(layout)
        compiled = compiled_flex_attention()
        # the warm-up call of interleaved_min compiles; only warm calls are timed
        fns.append(lambda: compiled(q, k, v, block_mask=block_mask, scale=dim ** -0.5))
    with torch.no_grad():
        cpu, sdpa, *flex_ms = interleaved_min(fns, repeats)
    yield name, "forward", cpu, "SDPA causal (dense)", sdpa
    if flex:
        yield name, "forward", cpu, "compiled FlexAttention", flex_ms[0]


def memory_row(L, heads, dim, density):
    q, k, v = _inputs(L, heads, dim)
    layout = blockattn.patterns.random_blocks(L, density=density, heads=heads)
    small = blockattn.patterns.causal(128)
    blockattn.attention(q[:, :, :128], k[:, :, :128], v[:, :, :128], small, backend="cpu")
    with torch.no_grad():
        out, grown = peak_rss_growth(lambda: blockattn.attention(q, k, v, layout, backend="cpu"))
    return grown - out.numel() * out.element_size()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--causal-length", type=int, default=8192)
    parser.add_argument("--random-length", type=int, default=16384)
    parser.add_argument("--memory-length", type=int, default=65536)
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (slow to compile)")
    parser.add_argument("--png", default=None, help="write a bar chart of the ratios to this path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads, dim = 8, 64
    from tqdm import tqdm

    rows = []
    steps = [lambda: causal_rows(args.causal_length, heads, dim, args.repeats),
             lambda: random_rows(args.random_length, heads, dim, args.repeats, not args.no_flex)]
    for step in tqdm(steps, desc="cases"):
        rows.extend(step())
    from blockattn.ops import cpu as cpu_backend
    print(f"fp32, B=1, H=8, D=64, block 64, {args.threads} threads, min of {args.repeats}, "
          f"cpu forward: {cpu_backend.isa()} (BLOCKATTN_CPU_ISA=avx2 forces the AVX2 + MKL path)\n")
    print("| case | mode | cpu ms | baseline | baseline ms | cpu / baseline |")
    print("|---|---|---|---|---|---|")
    for case, mode, cpu, base_name, base in rows:
        print(f"| {case} | {mode} | {cpu:.0f} | {base_name} | {base:.0f} | {cpu / base:.3f} |")
    grown = memory_row(args.memory_length, heads, dim, 0.05)
    print(f"\nL={args.memory_length}, 5% of causal tiles: peak RSS growth of one forward call beyond q, k, v "
          f"and out = {grown / 2**20:.1f} MiB")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.5))
        labels = [f"{c} {m}\nvs {b}" for c, m, _, b, _ in rows]
        ax.barh(labels, [cpu / base for _, _, cpu, _, base in rows])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("time of the cpu kernel / baseline (lower is better)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
