"""Gemma 3 270M: is blockattn's "structure only" model (`hf.patch(model, "dense")`) the same model?

At one length (default 4,096 tokens of real text, eight sliding windows):
- fp32: relative error of the patched logits against the unpatched model's (last `--positions` positions);
- fp32: greedy continuation of that prompt (`--new-tokens`), patched vs unpatched, token for token;
- bf16: the error of each bf16 model (unpatched, patched) against the fp32 unpatched logits — the patched
  one must be at most 1.5x the unpatched one's (the bf16 paths round differently; neither is exact).

    nice .venv/bin/python benchmarks/gemma3_exactness.py --length 4096
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from blockattn import hf, models
from blockattn.bench import machine, tasks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--positions", type=int, default=256, help="logit positions compared (the LM head is 262k wide)")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model, tokenizer = models.load("gemma3-270m", dtype=torch.float32)
    if args.length > model.config.max_position_embeddings:
        raise ValueError(f"--length {args.length} exceeds Gemma 3's context of {model.config.max_position_embeddings}")
    ids = tasks.document_ids(tokenizer, args.length, seed=1)
    keep = args.positions
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    with torch.no_grad():
        ref = model(ids, use_cache=False, logits_to_keep=keep).logits
        with hf.patch(model, "dense"):
            patched = model(ids, use_cache=False, logits_to_keep=keep).logits
        plain_gen = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        with hf.patch(model, "dense"):
            patched_gen = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        model.bfloat16()
        plain_bf16 = model(ids, use_cache=False, logits_to_keep=keep).logits.float()
        with hf.patch(model, "dense"):
            patched_bf16 = model(ids, use_cache=False, logits_to_keep=keep).logits.float()
    new_plain, new_patched = plain_gen[0, args.length:], patched_gen[0, args.length:]
    same = int((new_plain == new_patched).sum())
    err_plain, err_patched = rel(plain_bf16, ref), rel(patched_bf16, ref)
    print(f"CPU: {machine.cpu_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"Gemma 3 270M, {args.length} tokens of real text, last {keep} positions' logits\n")
    print("| check | result |\n|---|---|")
    print(f"| fp32 patched 'dense' vs unpatched logits, relative error | {rel(patched, ref):.2e} |")
    print(f"| fp32 greedy continuation, {args.new_tokens} new tokens | {same}/{len(new_plain)} identical "
          f"({'token-identical' if torch.equal(plain_gen, patched_gen) else 'DIFFERENT'}): "
          f"{tokenizer.decode(new_patched)!r} |")
    print(f"| bf16 unpatched vs fp32 | {err_plain:.2e} |")
    print(f"| bf16 patched vs fp32 | {err_patched:.2e} ({err_patched / err_plain:.2f}x the unpatched bf16 error) |")
    print(f"\nwall time {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
