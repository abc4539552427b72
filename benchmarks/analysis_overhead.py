"""What the `blockattn.analysis` hook machinery costs a patched prefill.

    nice python benchmarks/analysis_overhead.py                       # SmolLM2, 512 and 1024 tokens
    nice python benchmarks/analysis_overhead.py --lengths 2048 --repeats 7

SmolLM2-135M patched with "dense"; one prefill of `length` random tokens, timed under four conditions,
interleaved round-robin so that load drifts hit all of them alike (minimum and median over repeats):
  no hooks           the patched forward as users run it (the hook point is one dict lookup per layer)
  hooks, idle        `analysis.hooks(model)` installed, nothing requested
  rows, last token   recording the attention rows of the last position in every layer
  ablate 14 heads    zero-ablating 14 heads (5% of 270)
Also the hook point itself: the time of the dict lookup it adds, times the layers, against the forward.
"""
from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

from blockattn import analysis, hf, models
from blockattn.bench.machine import cpu_description
from blockattn.integrations.hf import HOOKS_ATTR


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = models.load(args.model)
    patch = hf.patch(model, "dense")
    modules = hf.attention_modules(model)
    heads = model.config.num_attention_heads
    chosen = torch.randperm(len(modules) * heads, generator=torch.Generator().manual_seed(0))[:14].tolist()
    ablated = {divmod(i, heads): "zero" for i in chosen}
    print(f"{args.model} patched dense, prefill, {args.threads} thread(s); {cpu_description()}")
    lookup_s = min(timeit.repeat(lambda: modules[0].__dict__.get(HOOKS_ATTR), number=100_000, repeat=5)) / 100_000
    print(f"hook point: one __dict__ lookup {lookup_s * 1e9:.0f} ns x {len(modules)} layers = "
          f"{lookup_s * len(modules) * 1e6:.1f} us per forward")
    print(f"{'length':>6}  {'condition':<18} {'min ms':>9} {'median ms':>10} {'min vs no hooks':>16}")
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))

        def run(setup):
            if setup is None:
                start = time.perf_counter()
                model(ids, use_cache=False)
                return time.perf_counter() - start
            with analysis.hooks(model) as h:
                setup(h)
                start = time.perf_counter()
                model(ids, use_cache=False)
                return time.perf_counter() - start

        conditions = {
            "no hooks": None,
            "hooks, idle": lambda h: None,
            "rows, last token": lambda h: h.record_rows([length - 1]),
            "ablate 14 heads": lambda h: h.ablate(ablated),
        }
        times = {name: [] for name in conditions}
        with torch.no_grad():
            for setup in conditions.values():
                run(setup)  # warm-up
            for _ in range(args.repeats):
                for name, setup in conditions.items():
                    times[name].append(run(setup))
        base = min(times["no hooks"])
        for name, values in times.items():
            print(f"{length:>6}  {name:<18} {min(values) * 1e3:9.1f} {statistics.median(values) * 1e3:10.1f} "
                  f"{min(values) / base:15.3f}x")
        print(f"{length:>6}  hook point / forward: {lookup_s * len(modules) / base:.1e}")
    patch.unpatch()


if __name__ == "__main__":
    main()
