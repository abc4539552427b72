"""Selection cost of every LLM-prefill method against the engine's full-causal attention, same call.

    nice python benchmarks/selection.py                      # 8k and 16k, every LLM-prefill method
    nice python benchmarks/selection.py --lengths 8192 --methods sale routing --profile
    nice python benchmarks/selection.py --shape gemma3 --lengths 16384 32768 --methods xattention

SmolLM2-135M shapes (`--shape smollm2`): B=1, 9 query heads, 3 key heads, D=64, float32; Gemma 3 270M
shapes (`--shape gemma3`): B=1, 4 query heads, 1 key head, D=256, bfloat16 q/k/v (the attention in
bf16 too). Causal, 2 threads (`--threads`).
For each length: `method.select(q, k)` time (ms, minimum over repeats), the engine's full-causal
`blockattn.attention(q, k, v, patterns.causal(L))` time on the same q/k/v (timed again right before
each method, so the pair sees the same load), and their ratio (the
issue's bar is <= 0.10). Inputs are random normal q/k/v (seed 0): selection cost, not quality, is
measured here. `--profile` adds the three torch ops with the most self CPU time inside `select`
(a hint of where the time goes). Timings on a shared machine are noisy: the minimum is reported.

LLM-prefill methods are the registered methods that select on a causal 1-D sequence with no token
grid; methods that need a grid, are encoder-only, or static (no q/k) are listed as not measured.
"""
from __future__ import annotations

import argparse
import platform
import subprocess

import torch

import blockattn
from blockattn import patterns
from blockattn.bench.timing import time_call

# static layouts: no q/k work, so no selection cost to cut
STATIC = ("dense", "a_shape", "sliding_window", "streaming")
# need a video/image token grid or are bidirectional vision methods
NOT_LLM = ("biformer", "paro", "vmoba")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def profile_hint(fn, top: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:top])


SHAPES = {"smollm2": (9, 3, 64, torch.float32), "gemma3": (4, 1, 256, torch.bfloat16)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: every LLM-prefill one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2",
                        help="model shapes: query heads, key heads, head dim, dtype (see above)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--profile", action="store_true", help="add the top torch ops of each select")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.methods or [n for n in blockattn.methods.training_free() if n not in STATIC + NOT_LLM]
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {args.threads} threads; engine backend "
          f"{'cpu' if blockattn.backends().get('cpu') == 'available' else 'torch'}")
    heads, heads_kv, dim, dtype = SHAPES[args.shape]
    print(f"shape {args.shape}: B=1, {heads} query heads, {heads_kv} key heads, D={dim}, {str(dtype)[6:]}")
    print(f"not measured: static {', '.join(STATIC)}; need a grid / not causal 1-D: {', '.join(NOT_LLM)}")
    header = "| method | L | select ms | causal attention ms | select / attention |" + \
        (" profile (self CPU) |" if args.profile else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for length in args.lengths:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, length, dim, generator=gen).to(dtype)
        k = torch.randn(1, heads_kv, length, dim, generator=gen).to(dtype)
        v = torch.randn(1, heads_kv, length, dim, generator=gen).to(dtype)
        layout = patterns.causal(length)
        blockattn.attention(q, k, v, layout)  # warm-up
        for name in names:
            method = blockattn.methods.get(name)
            # attention timed right before each method (paired): on a shared machine the load drifts
            attend = time_call(lambda: blockattn.attention(q, k, v, layout), repeats=args.repeats, warmup=0)
            try:
                select = time_call(lambda: method.select(q, k, causal=True), repeats=args.repeats,
                                   warmup=args.warmup)
            except Exception as err:  # one failing method must not lose the table
                print(f"| {name} | {length} | error: {type(err).__name__}: {err} | {attend:.0f} | |")
                continue
            row = f"| {name} | {length} | {select:.0f} | {attend:.0f} | {select / attend:.2f} |"
            if args.profile:
                row += f" {profile_hint(lambda: method.select(q, k, causal=True))} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
