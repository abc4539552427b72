"""Neighborhood attention speed on CPU: the block engine against dense SDPA and compiled FlexAttention on
the same mask, timed in one run; and GNA's simulator (predicted tile fraction and upper-bound speedup)
against the measured engine speedup over a dense layout with the same tiles.

    .venv/bin/python benchmarks/neighborhood.py [--repeats 5] [--record docs/bench/patterns.md] [--plot PNG]

Timings are minimums over repeats on a shared machine: they are noisy, compare ratios within one run.
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F

import blockattn
from blockattn import patterns
from blockattn.bench.timing import record_markdown, time_call
from blockattn.ops.dispatch import choose
from blockattn.ops.flex import compiled_flex_attention
from blockattn.patterns.simulator import simulate

MAIN = dict(grid=(64, 64), window=13, tile=(8, 8), heads=4, dim=64)
# (grid, window, stride, tile): two plain NA windows (many tiles need token masks) and three GNA
# configurations whose stride makes them perfectly block-sparse (no token masks at all)
SIM_CONFIGS = [
    ((64, 64), 13, 1, (8, 8)),
    ((64, 64), 21, 1, (8, 8)),
    ((64, 64), 16, 16, (8, 8)),
    ((64, 64), 24, 8, (8, 8)),
    ((64, 64), 40, 8, (8, 8)),
]
SIM_HEADS = 16  # more heads per engine call amortise the portable backend's per-query-block Python overhead


def _inputs(length, heads, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, dim, generator=generator) for _ in range(3)]


def _flex_ms(q, k, v, layout, repeats):
    block_mask = layout.to_block_mask()
    fn = compiled_flex_attention()
    call = lambda: fn(q, k, v, block_mask=block_mask)  # noqa: E731
    start = time.perf_counter()
    call()
    compile_s = time.perf_counter() - start
    return time_call(call, repeats=repeats, warmup=1), compile_s


def main_comparison(repeats: int, backend: str):
    grid, window, tile, heads, dim = MAIN["grid"], MAIN["window"], MAIN["tile"], MAIN["heads"], MAIN["dim"]
    length = math.prod(grid)
    q, k, v = _inputs(length, heads, dim)
    row_major = patterns.neighborhood(grid, window=window)
    tiled = patterns.neighborhood(grid, window=window, tile_shape=tile)
    mask = row_major.to_token_mask()[0, 0]
    rows = []
    sdpa_dense = time_call(lambda: F.scaled_dot_product_attention(q, k, v), repeats=repeats)
    sdpa_masked = time_call(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats=repeats)
    rows.append(("SDPA, dense boolean mask (baseline)", sdpa_masked, None, 1.0))
    rows.append(("SDPA, no mask (full attention)", sdpa_dense, None, 1.0))
    # the engine must agree with SDPA before we time it
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qt, kt, vt = (patterns.to_tiled(x, grid, tile) for x in (q, k, v))
    for name, layout, args in ((f"blockattn {backend}, row-major, block 64", row_major, (q, k, v)),
                               (f"blockattn {backend}, GNA tiled 8x8", tiled, (qt, kt, vt))):
        out = blockattn.attention(*args, layout, backend=backend)
        if layout is tiled:
            out = patterns.from_tiled(out, grid, tile)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        ms = time_call(lambda: blockattn.attention(*args, layout, backend=backend), repeats=repeats)
        rows.append((name, ms, None, layout.density()))
    for name, layout, args in (("FlexAttention (compiled), row-major mask", row_major, (q, k, v)),
                               ("FlexAttention (compiled), tiled mask", tiled, (qt, kt, vt))):
        ms, compile_s = _flex_ms(*args, layout, repeats)
        rows.append((name, ms, compile_s, layout.density()))
    return rows, sdpa_masked


def simulator_vs_measured(repeats: int, backend: str, heads: int, dim: int):
    from tqdm import tqdm

    results = []
    for grid, window, stride, tile in tqdm(SIM_CONFIGS, desc="simulator vs measured"):
        length, block = math.prod(grid), math.prod(tile)
        sim = simulate(grid, window=window, stride=stride, tile_shape=tile)
        layout = patterns.neighborhood(grid, window=window, stride=stride, tile_shape=tile, block_q=block, block_k=block)
        dense = patterns.full(length, block_q=block, block_k=block)
        q, k, v = _inputs(length, heads, dim, seed=1)
        dense_ms = time_call(lambda: blockattn.attention(q, k, v, dense, backend=backend), repeats=repeats)
        sparse_ms = time_call(lambda: blockattn.attention(q, k, v, layout, backend=backend), repeats=repeats)
        masked = 0.0 if layout.tile_mask_ids is None else float((layout.tile_mask_ids >= 0).sum() / layout.kv_counts.sum())
        results.append((grid, window, stride, tile, sim, (layout.density(), masked), dense_ms, sparse_ms))
    return results


def format_report(rows, sdpa_ms, sims, backend, repeats, command) -> str:
    g, w = MAIN["grid"], MAIN["window"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, "
             f"engine backend `{backend}` (what `backend=\"auto\"` picks here), {repeats} repeats (min). "
             "Shared machine: timings are noisy; compare ratios within the run.", "",
             f"2D neighborhood attention, {g[0]}x{g[1]} tokens, {w}x{w} window, D={MAIN['dim']}, "
             f"{MAIN['heads']} heads, B=1, forward:", "",
             "| implementation | ms | vs SDPA (masked) | tiles computed | Flex compile s |", "|---|---|---|---|---|"]
    for name, ms, compile_s, density in rows:
        lines.append(f"| {name} | {ms:.1f} | {ms / sdpa_ms:.2f} | {density:.3f} | "
                     f"{'-' if compile_s is None else f'{compile_s:.1f}'} |")
    lines += ["", f"GNA simulator vs measurement (tiled order; measured = engine time with a full layout of the "
              f"same tiles / engine time with the NA layout; D={MAIN['dim']}, {SIM_HEADS} heads, B=1):", "",
              "| grid | window | stride | tile | predicted tile fraction | layout tile fraction | tiles with token masks "
              "| predicted speedup (upper bound) | measured speedup | measured / predicted |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for grid, window, stride, tile, sim, (density, masked), dense_ms, sparse_ms in sims:
        measured = dense_ms / sparse_ms
        lines.append(f"| {grid} | {window} | {stride} | {tile} | {sim.tile_fraction:.4f} | {density:.4f} | {masked:.2f} | "
                     f"{sim.speedup_upper_bound:.2f}x | {measured:.2f}x | {measured / sim.speedup_upper_bound:.2f} |")
    return "\n".join(lines)


def plot(rows, sims, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r[0] for r in rows]
    left.barh(range(len(rows)), [r[1] for r in rows], color="tab:blue")
    left.set_yticks(range(len(rows)), names, fontsize=7)
    left.set_xlabel("ms (forward)")
    left.set_title(f"2D NA {MAIN['grid'][0]}x{MAIN['grid'][1]}, window {MAIN['window']}", fontsize=9)
    predicted = [s[4].speedup_upper_bound for s in sims]
    measured = [s[6] / s[7] for s in sims]
    labels = [f"w{s[1]} s{s[2]}" for s in sims]
    x = range(len(sims))
    right.bar([i - 0.2 for i in x], predicted, width=0.4, label="simulator (upper bound)")
    right.bar([i + 0.2 for i in x], measured, width=0.4, label="measured (engine)")
    right.set_xticks(list(x), labels)
    right.set_ylabel("speedup over dense layout")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", default="docs/bench/patterns.md", help="markdown file for the tables ('' = none)")
    parser.add_argument("--plot", default="docs/bench/neighborhood.png", help="PNG ('' = none)")
    args = parser.parse_args(argv)
    backend = choose(torch.device("cpu"))
    rows, sdpa_ms = main_comparison(args.repeats, backend)
    sims = simulator_vs_measured(args.repeats, backend, SIM_HEADS, MAIN["dim"])
    command = "python benchmarks/neighborhood.py" + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
    report = format_report(rows, sdpa_ms, sims, backend, args.repeats, command)
    print(report)
    if args.record:
        record_markdown(args.record, "neighborhood", report)
    if args.plot:
        plot(rows, sims, args.plot)


if __name__ == "__main__":
    main()
