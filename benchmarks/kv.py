"""KV policies on SmolLM2-135M: passkey accuracy vs compression ratio, KV bytes held, decode tokens/s.

    nice .venv/bin/python benchmarks/kv.py --length 4096 --depths 0.1 0.5 0.9 --ratios 0.5 0.7 0.9

Protocol (kvpress's query-agnostic one): the context (the passkey prompt minus its question) is prefilled
densely; the policy compresses that prefill's K/V; the question is then fed as one chunk and the answer
scored token by token (teacher forcing) from the compressed cache, so every answer token is predicted
by attention over the kept tokens only. To spare the shared CPU, the context is prefilled once per sample
and its per-layer K/V (and last 64 queries) are handed to every policy's `select`, exactly as
`hf.patch(kv=...)` does after its own prefill; one policy is also run end to end through
`model(context, use_cache=True)` on the first sample and must give the same cache. ACT changes the
prefill itself, so it runs end to end. Decode tokens/s: greedy steps after the answer, against the
unpatched model (SDPA, DynamicCache) on the same context in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import blockattn
from blockattn import hf, kv
from blockattn.bench import tasks
from blockattn.kv._hf import _store
from blockattn.kv.base import Policy, Selection
from blockattn.kv.cache import KVCache, KVLayer


@dataclasses.dataclass
class Capture(Policy):
    """Keeps everything and records each layer's prefill (last 64 queries, keys, values, scale)."""
    compresses = False

    def __post_init__(self):
        self.layers = {}

    def select(self, layer, query, key, value, scale):
        self.layers[layer] = (query[:, :, -64:].clone(), key, value, scale)
        batch, heads, n, _ = key.shape
        return Selection([torch.arange(n).expand(batch, n)] * heads)


def build_cache(policy, captured, n) -> KVCache:
    cache = KVCache(policy)
    for layer in sorted(captured):
        q, k, v, scale = captured[layer]
        state = KVLayer()
        state.lazy_initialization(k, v)
        state.seen = n
        _store(state, policy.select(layer, q, k, v, scale), k, v)
        cache.layers.append(state)
    return cache


@torch.no_grad()
def score(model, cache, question, answer, steps):
    """(all answer tokens greedy-correct, decode tokens/s over `steps` greedy steps after the answer)."""
    out = model(question, past_key_values=cache, use_cache=True)
    ok = int(out.logits[0, -1].argmax()) == int(answer[0, 0])
    for t in range(answer.shape[1]):
        out = model(answer[:, t:t + 1], past_key_values=cache, use_cache=True)
        if t + 1 < answer.shape[1]:
            ok = ok and int(out.logits[0, -1].argmax()) == int(answer[0, t + 1])
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return ok, steps / (time.perf_counter() - start)


def question_length(tokenizer, ids) -> int:
    """Tokens of the trailing "\nQuestion: ..." of a multi-needle prompt."""
    for back in range(1, min(64, len(ids))):
        if tokenizer.decode(ids[-back:]).lstrip(" ").startswith("\nQuestion"):
            return back
    raise ValueError("no trailing question found in the prompt")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--policies", nargs="+", default=["streaming", "snapkv", "tova", "knorm", "razor"])
    parser.add_argument("--tidal", type=int, nargs="*", default=[64, 256], help="TidalDecode top_k values")
    parser.add_argument("--act", action="store_true", help="also run ACT end to end (one more prefill a sample)")
    parser.add_argument("--probe-period", type=int, default=1000, help="RazorAttention probe R (4R+1 tokens)")
    parser.add_argument("--steps", type=int, default=8, help="greedy decode steps timed per run")
    parser.add_argument("--task", choices=["passkey", "multi_needle"], default="passkey")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="samples per depth (multi_needle: per run)")
    parser.add_argument("--moa-plan", default=None, help="a MoA plan JSON: adds MoA and the uniform window at the "
                                                       "same densities (ratios)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, tokenizer = blockattn.models.load("smollm2-135m")
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    q_len = len(enc(" " + tasks.QUESTION.strip()))
    configs = [("dense (unpatched SDPA)", None)]
    configs += [(f"{p}:ratio={r}", kv.get(p, ratio=r, **({"probe_period": args.probe_period} if p == "razor" else {})))
                for p in args.policies for r in args.ratios]
    configs += [(f"tidaldecode:top_k={k}", kv.get("tidaldecode", top_k=k)) for k in args.tidal]
    if args.moa_plan:
        # max_new=0: both keep their span of the prompt itself, so they hold the same bytes
        configs += [(f"moa plan:ratio={r}", kv.get("moa", plan=args.moa_plan, ratio=r, max_new=0))
                    for r in args.ratios]
        configs += [(f"uniform window (moa, no plan):ratio={r}", kv.get("moa", ratio=r, max_new=0))
                    for r in args.ratios]
    if args.act:
        configs.append(("act (end to end)", "act"))
    rows = {label: {"ok": 0, "runs": 0, "bytes": [], "tps": [], "error": None} for label, _ in configs}
    patches = {}
    for label, policy in configs:   # set up each policy once (RazorAttention's probe runs here)
        if isinstance(policy, Policy):
            with hf.patch(model, kv=policy):
                pass
            patches[label] = policy

    runs = [(d, s) for d in args.depths for s in args.seeds] if args.task == "passkey" else \
        [(None, s) for s in args.seeds]
    for depth, seed in runs:
        if args.task == "passkey":
            sample = tasks.passkey(tokenizer, args.length, depth, seed=seed, model=model)
        else:
            sample = tasks.multi_needle(tokenizer, args.length, seed=seed, model=model)
            q_len = question_length(tokenizer, sample.prompt[0])
        context, question = sample.prompt[:, :-q_len], sample.prompt[:, -q_len:]
        n = context.shape[1]
        capture = Capture()
        start = time.perf_counter()
        with torch.no_grad(), hf.patch(model, kv=capture):
            model(context, use_cache=True)
        seconds = time.perf_counter() - start
        print(f"depth {depth} seed {seed}: context of {n} tokens prefilled in {seconds:.1f} s", flush=True)
        dense_bytes = sum(2 * k.numel() * k.element_size() for _, k, _, _ in capture.layers.values())
        for label, policy in configs:
            row = rows[label]
            if row["error"]:
                continue
            try:
                if policy is None:
                    from transformers import DynamicCache
                    cache = DynamicCache()
                    for layer in sorted(capture.layers):
                        _, k, v, _ = capture.layers[layer]
                        cache.update(k, v, layer)
                    held = kv.cache_bytes(cache)
                    ok, tps = score(model, cache, question, sample.answer, args.steps)
                elif policy == "act":
                    with torch.no_grad(), hf.patch(model, kv="act"):
                        cache = model(context, use_cache=True).past_key_values
                        held = kv.cache_bytes(cache)
                        ok, tps = score(model, cache, question, sample.answer, args.steps)
                else:
                    with hf.patch(model, kv=policy):
                        cache = build_cache(policy, capture.layers, n)
                        held = kv.cache_bytes(cache)
                        ok, tps = score(model, cache, question, sample.answer, args.steps)
            except ValueError as error:
                row["error"] = str(error).split(";")[0][:90]
                continue
            row["ok"] += ok
            row["runs"] += 1
            row["bytes"].append(held / dense_bytes)
            row["tps"].append(tps)
        if (depth, seed) != runs[0]:
            continue
        # the shortcut equals the real path: one policy end to end (first sample)
        check = kv.get("knorm", ratio=0.7)
        with torch.no_grad(), hf.patch(model, kv=check):
            real = model(context, use_cache=True).past_key_values
            shortcut = build_cache(check, capture.layers, n)
        assert real.lengths() == shortcut.lengths() and all(
            torch.equal(a, b) for x, y in zip(real.layers, shortcut.layers) for a, b in zip(x.positions, y.positions))
        del capture

    print(f"\nSmolLM2-135M, {args.task} at {args.length} tokens, depths {args.depths}, seeds {args.seeds}, "
          f"decode steps {args.steps}\n")
    print("| policy | passkey | KV bytes held / dense | decode tok/s |")
    print("|---|---|---|---|")
    for label, _ in configs:
        row = rows[label]
        if row["error"] and not row["runs"]:
            print(f"| {label} | n/a: {row['error']} | | |")
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        print(f"| {label} | {row['ok']}/{row['runs']} | {mean(row['bytes']):.3f} | {mean(row['tps']):.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
