"""Quality and selection overhead of PARO, HiP, LongHeads, BiFormer and Routing selection on SmolLM2 q/k/v.

    python benchmarks/methods_b_quality.py --lengths 4096 8192 --layers 2 20

Text: Python's own documentation. For each length one prefill captures post-RoPE q/k/v at the given
layers; each configuration selects a layout per layer and `blockattn.bench.quality` reports recall of
dense causal attention mass, output relative error, density, selection time as a fraction of dense
attention time (same backend, same run) and select+attend speedup, averaged over the layers. The
vision methods run with `causal=True` on the token sequence (PARO without a grid: identity order).
"""
import argparse
import os

from tqdm import tqdm

import blockattn
from blockattn.bench.capture import capture_qkv, load_smollm2, real_text_ids
from blockattn.bench.quality import format_table, measure_layers
from blockattn.bench.timing import record_markdown

CONFIGS = {
    "hip": ("hip", {}),
    "longheads": ("longheads", {}),
    "longheads(atten_length=2048,begin=2048)": ("longheads", dict(atten_length=2048, begin_selective_length=2048)),
    "biformer(causal)": ("biformer", dict(causal=True)),
    "biformer(causal,n_win=32,topk=8)": ("biformer", dict(causal=True, n_win=32, topk=8)),
    "paro(causal)": ("paro", dict(causal=True)),
    "routing": ("routing", {}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 20])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--record", default="docs/bench/methods_b.md")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    rows = []

    def record():
        table = format_table(rows)
        body = (f"Command: `python benchmarks/methods_b_quality.py --lengths {' '.join(map(str, args.lengths))} "
                f"--layers {' '.join(map(str, args.layers))}`\n\nSmolLM2-135M-Instruct (9 query / 3 key heads, "
                f"D=64), q/k/v captured at layers {args.layers} on Python's documentation text, means over those "
                f"layers; one timed run each; engine backend "
                f"`{'cpu' if blockattn.backends()['cpu'] == 'available' else 'torch'}`, 2 cores shared with other "
                f"jobs (load far above 2 during the run: timings are noisy and inflated; selection and dense times "
                f"of a row were measured back to back).\n\n{table}\n")
        if args.record:
            os.makedirs(os.path.dirname(args.record) or ".", exist_ok=True)
            record_markdown(args.record, "methods-b-quality", body)
        return table

    for length in args.lengths:
        captured = capture_qkv(model, real_text_ids(tokenizer, length), layers=args.layers)
        for label in tqdm(args.configs, desc=f"methods @ {length}"):
            name, params = CONFIGS[label]
            rows.append(measure_layers(blockattn.methods.get(name, **params), captured, name=label, repeats=1))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
            record()  # after every row, so an interrupted run keeps what it measured
    print(record())


if __name__ == "__main__":
    main()
