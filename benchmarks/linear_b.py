"""Titans / Miras / Kronecker attention on CPU: the tensor-attention approximation's error against the exact form
(and its bound), and speed ratios of each fast form against its naive twin, timed in the same run.

    .venv/bin/python benchmarks/linear_b.py [--repeats 3] [--record docs/bench/linear_b.md] [--plot PNG]

Timings are minimums over repeats on a shared 2-core machine: noisy; compare ratios within one run.
"""
from __future__ import annotations

import argparse
import platform

import torch
from tqdm import tqdm

from blockattn.bench.timing import record_markdown, time_call
from blockattn.linear.kronecker import entry_bound, error_bound, tensor_attention, tensor_attention_approx
from blockattn.linear.miras import memory_chunk, memory_naive
from blockattn.linear.miras.common import default_init
from blockattn.linear.miras.memora import Memora
from blockattn.linear.miras.moneta import Moneta
from blockattn.linear.titans import Titans

BOUNDS = (0.25, 0.5, 0.75, 1.0, 1.25)
DEGREES = (1, 2, 3, 4, 5, 6)
ERROR_SHAPE = dict(n=64, d=4, heads=2)


def _bounded(shape, bound, generator):
    return (2 * torch.rand(*shape, generator=generator, dtype=torch.float64) - 1) * bound


def error_table(causal: bool):
    """Max-abs output error of the degree-g approximation vs exact, entries of q, k1, k2 uniform in [−B, B]."""
    generator = torch.Generator().manual_seed(0)
    n, d, heads = ERROR_SHAPE["n"], ERROR_SHAPE["d"], ERROR_SHAPE["heads"]
    rows = []
    for bound in tqdm(BOUNDS, desc=f"kronecker error (causal={causal})"):
        q, k1, k2 = (_bounded((1, heads, n, d), bound, generator) for _ in range(3))
        v1, v2 = (_bounded((1, heads, n, d), 1.0, generator) for _ in range(2))
        exact = tensor_attention(q, k1, v1, k2=k2, v2=v2, causal=causal)
        beta = entry_bound(q, k1, k2, 1 / d)
        values = float(v1.abs().max() * v2.abs().max())
        for degree in DEGREES:
            approx = tensor_attention_approx(q, k1, v1, k2=k2, v2=v2, degree=degree, causal=causal)
            rows.append((bound, beta, degree, float((approx - exact).abs().max()), error_bound(beta, degree, values)))
    return rows


def kronecker_speed(repeats: int):
    generator = torch.Generator().manual_seed(1)
    rows = []
    for n in tqdm((32, 64, 128, 256), desc="kronecker speed"):
        q, k, v = (_bounded((1, 2, n, 4), 0.8, generator).float() for _ in range(3))
        t_exact = time_call(lambda: tensor_attention(q, k, v), repeats=repeats)
        t_approx = time_call(lambda: tensor_attention_approx(q, k, v, degree=4), repeats=repeats)
        rows.append((n, t_exact, t_approx))
    return rows


def memory_speed(repeats: int):
    generator = torch.Generator().manual_seed(2)
    rows = []
    configs = [("titans", Titans().parts, dict(momentum=0.9)), ("moneta", Moneta().parts, {}),
               ("memora", Memora().parts, {})]
    for name, parts, extra in tqdm(configs, desc="memory chunk vs loop"):
        for length in (128, 512):
            q, k, v = (torch.nn.functional.normalize(torch.randn(1, 2, length, 16, generator=generator), dim=-1)
                       for _ in range(3))
            init = default_init(parts, 2, 16, 16)
            kwargs = dict(parts=parts, lr=0.1, decay=0.99, init=init, chunk_size=16, **extra)
            with torch.no_grad():
                t_loop = time_call(lambda: memory_naive(q, k, v, **kwargs), repeats=repeats, warmup=0)
                t_chunk = time_call(lambda: memory_chunk(q, k, v, **kwargs), repeats=repeats)
            rows.append((name, length, t_loop, t_chunk))
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, bound in enumerate(BOUNDS):
        sel = [r for r in rows if r[0] == bound]
        color = f"C{i}"
        ax.semilogy([r[2] for r in sel], [r[3] for r in sel], "o-", color=color, label=f"B={bound} (β={sel[0][1]:.2f})")
        finite = [r for r in sel if r[4] != float("inf")]
        ax.semilogy([r[2] for r in finite], [r[4] for r in finite], "--", color=color, alpha=0.6)
    ax.set_xlabel("Taylor degree g")
    ax.set_ylabel("max |approx − exact|")
    ax.set_title("Tensor attention, bounded-entry approximation (n=64, d=4, causal)\nsolid: measured, dashed: bound")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", help="markdown file to write the tables into")
    parser.add_argument("--plot", help="PNG path for the error-vs-degree plot")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per helper: less contention noise on the shared machine

    lines = [f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             "shared machine, timings noisy (minimum of repeats).", ""]
    causal_rows = error_table(True)
    for causal, rows in ((True, causal_rows), (False, error_table(False))):
        lines += [f"**Kronecker approximation error vs exact** (n={ERROR_SHAPE['n']}, d={ERROR_SHAPE['d']}, "
                  f"{ERROR_SHAPE['heads']} heads, float64, causal={causal}; entries of q, k1, k2 uniform in [−B, B], "
                  "v in [−1, 1]; bound = 2ε/(1−ε)·‖V1‖∞‖V2‖∞, ε = e^{2β} β^{g+1}/(g+1)!, inf when ε ≥ 1)", "",
                  "| B | β | degree | max error | bound | within |", "|---|---|---|---|---|---|"]
        for bound, beta, degree, err, limit in rows:
            # below ~1e-13 the float64 roundoff of the exact form itself is what is measured
            verdict = "yes" if err <= limit else ("fp64 roundoff" if err < 1e-13 else "NO")
            lines.append(f"| {bound} | {beta:.3f} | {degree} | {err:.2e} | {limit:.2e} | {verdict} |")
        lines.append("")
    lines += ["**Kronecker speed**, exact O(n³) vs approximation (degree 4, d=4, rank 341), float32, 2 heads", "",
              "| n | exact ms | approx ms | exact / approx |", "|---|---|---|---|"]
    for n, t_exact, t_approx in kronecker_speed(args.repeats):
        lines.append(f"| {n} | {t_exact:.2f} | {t_approx:.2f} | {t_exact / t_approx:.1f}× |")
    lines += ["", "**Memory chunked form vs token loop** (forward, no grad, B=1, H=2, D=16, chunk 16)", "",
              "| method | L | token loop ms | chunked ms | loop / chunked |", "|---|---|---|---|---|"]
    for name, length, t_loop, t_chunk in memory_speed(args.repeats):
        lines.append(f"| {name} | {length} | {t_loop:.1f} | {t_chunk:.1f} | {t_loop / t_chunk:.1f}× |")
    body = "\n".join(lines)
    print(body)
    if args.record:
        record_markdown(args.record, "linear_b", body)
    if args.plot:
        plot(causal_rows, args.plot)


if __name__ == "__main__":
    main()
