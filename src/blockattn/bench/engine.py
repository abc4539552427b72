"""Engine speed: each backend over each layout family and length, against SDPA and compiled
FlexAttention timed in the same run."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import blockattn
from blockattn import patterns
from blockattn.bench.timing import peak_rss_growth, time_call

FAMILIES = {
    "causal": lambda L, heads: patterns.causal(L),
    "random-10%": lambda L, heads: patterns.random_blocks(L, density=0.1, heads=heads, seed=0),
    "window-1024": lambda L, heads: patterns.sliding_window(L, window=1024),
}


@dataclasses.dataclass
class Row:
    family: str
    length: int
    backend: str
    mode: str
    ms: float
    sdpa_ms: float
    flex_ms: float | None
    flex_compile_s: float | None
    density: float
    gflops: float
    peak_mib: float
    dtype: str = "fp32"
    gemm_gflops: float | None = None
    note: str = ""

    @property
    def vs_gemm(self) -> float | None:
        """This row's GFLOP/s as a fraction of a large GEMM of the same dtype timed in the same run."""
        return None if not self.gemm_gflops else self.gflops / self.gemm_gflops

    @property
    def vs_sdpa(self) -> float:
        return self.ms / self.sdpa_ms

    @property
    def vs_flex(self) -> float | None:
        return None if not self.flex_ms else self.ms / self.flex_ms


def _step(fn, backward: bool, inputs, grad):
    def run():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, inputs, grad)
        return out
    return run


def run_engine_benchmark(lengths, families, backends, *, heads=8, dim=64, backward=False, repeats=3,
                         flex=True, max_portable_len=4096, progress=True, dtypes=("fp32",),
                         gemm_size=4096):
    """Yields one Row per (dtype, family, length, backend); each dtype's GEMM peak is timed first."""
    from tqdm import tqdm

    from blockattn.bench.machine import DTYPES, gemm_gflops
    from blockattn.ops.flex import compiled_flex_attention

    peaks = {name: gemm_gflops(DTYPES[name], size=gemm_size) for name in dtypes}
    jobs = [(d, f, L) for d in dtypes for L in lengths for f in families]
    for dtype_name, family, length in tqdm(jobs, desc="bench", disable=not progress):
        dtype = DTYPES[dtype_name]
        layout = FAMILIES[family](length, heads)
        torch.manual_seed(0)
        inputs = [torch.randn(1, heads, length, dim, dtype=dtype, requires_grad=backward) for _ in range(3)]
        grad = torch.randn(1, heads, length, dim, dtype=dtype)
        causal_sdpa = layout.causal
        sdpa = _step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal_sdpa), backward,
                     inputs, grad)
        sdpa_ms = time_call(sdpa, repeats=repeats)
        pairs = layout.token_density() * length * length * heads
        flops = 4 * dim * pairs * (3.5 if backward else 1.0)  # backward ~2.5x forward matmul work
        flex_ms = compile_s = None
        if flex and not backward:  # torch has no FlexAttention backward on CPU
            # each layout's mask_mod is a new closure: without a reset, dynamo's recompile limit would
            # silently drop later rows to eager FlexAttention (dense scores)
            torch._dynamo.reset()
            block_mask = layout.to_block_mask()
            flex_fn = compiled_flex_attention()
            call = _step(lambda q, k, v: flex_fn(q, k, v, block_mask=block_mask), backward, inputs, grad)
            import time
            start = time.perf_counter()
            call()
            first = time.perf_counter() - start
            flex_ms = time_call(call, repeats=repeats, warmup=0)
            compile_s = max(first - flex_ms / 1e3, 0.0)
        for backend in backends:
            if backend == "torch" and length > max_portable_len:
                continue
            status = blockattn.backends().get(backend, "unknown backend")
            if status != "available":
                continue
            call = _step(lambda q, k, v: blockattn.attention(q, k, v, layout, backend=backend), backward, inputs,
                         grad)
            ms = time_call(call, repeats=repeats)
            _, peak = peak_rss_growth(call)
            yield Row(family, length, backend, "fwd+bwd" if backward else "fwd", ms, sdpa_ms, flex_ms, compile_s,
                      layout.density(), flops / ms / 1e6, peak / 2**20, dtype_name, peaks[dtype_name])


def format_table(rows) -> str:
    header = ("| dtype | layout | L | backend | mode | ms | vs SDPA | vs Flex | SDPA ms | Flex ms (compile s) | density "
              "| GFLOP/s | of GEMM peak (GEMM GFLOP/s) | peak MiB |")
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        flex = "-" if r.flex_ms is None else f"{r.flex_ms:.1f} ({r.flex_compile_s:.1f})"
        vs_flex = "-" if r.vs_flex is None else f"{r.vs_flex:.2f}"
        vs_gemm = "-" if r.vs_gemm is None else f"{r.vs_gemm:.2f} ({r.gemm_gflops:.0f})"
        lines.append(f"| {r.dtype} | {r.family} | {r.length} | {r.backend} | {r.mode} | {r.ms:.1f} | {r.vs_sdpa:.2f} "
                     f"| {vs_flex} | {r.sdpa_ms:.1f} | {flex} | {r.density:.3f} | {r.gflops:.1f} | {vs_gemm} "
                     f"| {r.peak_mib:.0f} |")
    return "\n".join(lines)


def machine_line() -> str:
    from blockattn.bench.machine import cpu_description
    return f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}, B=1, H=8, D=64, block 64"


def plot_rows(rows, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r.family for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 3.6), squeeze=False)
    for ax, family in zip(axes[0], families):
        mine = [r for r in rows if r.family == family]
        for backend in sorted({r.backend for r in mine}):
            pts = sorted((r.length, r.ms) for r in mine if r.backend == backend)
            ax.plot(*zip(*pts), marker="o", label=backend)
        base = sorted({(r.length, r.sdpa_ms) for r in mine})
        ax.plot(*zip(*base), marker="s", linestyle="--", label="SDPA (dense)")
        flex = sorted({(r.length, r.flex_ms) for r in mine if r.flex_ms})
        if flex:
            ax.plot(*zip(*flex), marker="^", linestyle=":", label="FlexAttention")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{family} ({mine[0].mode})")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
