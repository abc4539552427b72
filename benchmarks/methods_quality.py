"""Quality and speed of block-selection methods on q/k/v captured from SmolLM2 on real text.

    python benchmarks/methods_quality.py --lengths 4096 8192 --methods xattention moba

Text: Python's own documentation (`pydoc_data/topics.py`). For each length, one prefill captures
post-RoPE q/k/v at a few layers; each method then selects a layout per layer, and the table reports
recall of dense attention mass, output relative error, density, selection overhead (vs dense
attention on the same backend) and select+attend speedup, averaged over the layers.
"""
import argparse
import os

from tqdm import tqdm

import blockattn
from blockattn.bench import harness
from blockattn.bench.capture import capture_qkv, load_smollm2, real_text_ids
from blockattn.bench.quality import format_table, measure_layers, skip_reason
from blockattn.bench.timing import record_markdown


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="specs 'name' or 'name:key=value,...' (default: every registered method)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 20, 28])
    parser.add_argument("--record", default="docs/bench/methods.md")
    parser.add_argument("--section", default="methods-quality", help="marker name of the table in --record")
    parser.add_argument("--plot", default="docs/bench/methods", help="PNG prefix: PREFIX_recall.png, PREFIX_speed.png")
    args = parser.parse_args()
    methods = args.methods or [m for m in blockattn.methods.training_free() if m != "dense"]
    model, tokenizer = load_smollm2()
    rows, skipped = [], []
    for length in args.lengths:
        captured = capture_qkv(model, real_text_ids(tokenizer, length), layers=args.layers)
        for name in tqdm(methods, desc=f"methods @ {length}"):
            method_name, params = harness.parse_method(name)
            method = blockattn.methods.get(method_name, **params)
            reason = skip_reason(method, *next(iter(captured.values()))[:2])
            if reason:  # e.g. video methods that need grid=(T, H, W)
                print(f"skipped {name}: {reason}")
                skipped.append(f"- {name} @ {length}: {reason}\n")
                continue
            rows.append(measure_layers(method, captured, name=name))
    table = format_table(rows)
    print(table)
    body = (f"Command: `python benchmarks/methods_quality.py --lengths {' '.join(map(str, args.lengths))}"
            f" --layers {' '.join(map(str, args.layers))}"
            f" --methods {' '.join(methods)}`; plots: `{args.plot}_recall.png`, `{args.plot}_speed.png`\n\nSmolLM2-135M-Instruct (9 query / 3 key heads, D=64), q/k/v captured "
            f"at layers {args.layers} on Python's documentation text, means over those layers; each method with its "
            f"paper defaults; engine backend `{'cpu' if blockattn.backends()['cpu'] == 'available' else 'torch'}`, "
            f"2 threads, shared machine (timings noisy).\n\n{table}\n"
            + ("\nNot measured (need a video token grid or other context):\n" + "".join(dict.fromkeys(skipped))
               if skipped else ""))
    if args.plot:
        from blockattn.commands.compare import plot
        print("wrote", *plot(rows, args.plot))
    if args.record:
        os.makedirs(os.path.dirname(args.record) or ".", exist_ok=True)
        record_markdown(args.record, args.section, body)


if __name__ == "__main__":
    main()
