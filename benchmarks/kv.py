"""KV policies on SmolLM2-135M: merge `blockattn eval --kv` runs, the memory bound, ACT's calibration effect.

The accuracy-vs-compression runs themselves are `blockattn eval --kv ...` (`blockattn.bench.kv_eval`; its
docstring states the protocol). This script adds what a table of one run does not show:

    # several short runs (one per depth) as one table + plot
    python benchmarks/kv.py merge OUT run_a/kv_results.json run_b/kv_results.json ...
    # memory is real: cache_bytes against (1 − r) × dense bytes and the resident memory each cache adds
    python benchmarks/kv.py memory run/kv_results.json
    # ACT: sinks per layer, perplexity and passkey with and without the calibration
    MALLOC_MMAP_THRESHOLD_=65536 nice python benchmarks/kv.py act --length 2048

Memory. `cache_bytes` counts every tensor the cache holds (per-head K/V, the int32 position of each kept
token, RazorAttention's compensation slots). The bound checked is cache_bytes ≤ (1 − r) × dense × 1.05 +
fixed, fixed = one compensation slot per compressed KV head (k̂, v̂, N_d: 2·D·4 + 4 bytes in fp32); the
per-token position (4 bytes over 2·D·4, 0.8% in fp32) sits inside the 5%. RSS added is the process's
resident memory (/proc/self/statm, after gc) with the cache held minus before it was built; run with
`MALLOC_MMAP_THRESHOLD_=65536` so glibc maps every buffer ≥ 64 KiB on its own and returns it when freed
(otherwise freed prefill buffers are reused silently and RSS shows nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def merge(out: str, paths: list[str]) -> dict:
    from blockattn.bench import kv_eval
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    results = kv_eval.merge(parts)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kv_results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    table = kv_eval.format_table(results)
    with open(os.path.join(out, "kv_table.md"), "w") as f:
        f.write(table + "\n")
    kv_eval.plot(results, os.path.join(out, "kv_accuracy.png"))
    print(table)
    return results


def memory_table(results: dict, *, head_dim: int = 64, kv_heads: int = 90, dtype_bytes: int = 4) -> str:
    """Per compressing row and length: bytes held, the bound, RSS added; then the end-to-end rows."""
    fixed = kv_heads * (2 * head_dim * dtype_bytes + 4)
    lines = [f"fixed overhead allowed: {fixed} B ({kv_heads} KV heads × one compensation slot)", "",
             "| policy | L | ratio r | cache_bytes MiB | (1 − r) × dense MiB | held / ((1 − r) × dense) | "
             "within bound | RSS added MiB |", "|---|---|---|---|---|---|---|---|"]
    dense = {int(k): v for k, v in results["dense_kv_bytes"].items()}
    for row in results["rows"]:
        ratio = row.get("ratio")
        if ratio is None or row is results["rows"][0]:
            continue
        for length in sorted({c["length"] for c in row["cells"]}):
            cells = [c for c in row["cells"] if c["length"] == length]
            # the cell closest to its bound (contexts of one length may differ by a few tokens)
            worst = max(cells, key=lambda c: c["kv_bytes"] / c.get("dense_bytes", dense[length]))
            held, target = worst["kv_bytes"], (1 - ratio) * worst.get("dense_bytes", dense[length])
            rss = [c["rss_mib"] for c in cells if c["rss_mib"] == c["rss_mib"]]
            ok = held <= target * 1.05 + fixed
            lines.append(f"| {row['policy']} | {length} | {ratio} | {held / 2**20:.2f} | {target / 2**20:.2f} | "
                         f"{held / target:.3f} | {'yes' if ok else 'NO'} | "
                         f"{(sum(rss) / len(rss)) if rss else float('nan'):.1f} |")
    lines += ["", "End to end (`model(context, use_cache=True)`, RSS with the returned cache held minus before):", "",
              "| run | L | cache_bytes MiB | RSS added MiB |", "|---|---|---|---|"]
    for length, runs in results.get("end_to_end", {}).items():
        for name, entry in runs.items():
            lines.append(f"| {name} | {length} | {entry['kv_bytes'] / 2**20:.2f} | {entry['rss_mib']:.1f} |")
    return "\n".join(lines)


def act(length: int, depths: list[float]) -> None:
    """ACT on SmolLM2: sinks per layer on real text, perplexity of that text and passkey, with vs without."""
    import time

    import torch

    import blockattn
    from blockattn import hf, kv
    from blockattn.bench import kv_eval, tasks

    model, tokenizer = blockattn.models.load("smollm2-135m")
    ids = tasks.document_ids(tokenizer, length)
    tail = min(1024, length - 1)

    def nll(policy):
        """Per-token NLL of the last `tail` tokens; ACT acts on `use_cache` calls (its prefill calibration)."""
        with torch.no_grad():
            if policy is None:
                logits = model(ids, use_cache=True, logits_to_keep=tail + 1).logits
            else:
                with hf.patch(model, kv=policy):
                    logits = model(ids, use_cache=True, logits_to_keep=tail + 1).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, -tail:], reduction="none")

    start = time.perf_counter()
    dense = nll(None)
    policy = kv.get("act")
    calibrated = nll(policy)
    keep_all = nll(kv.get("streaming"))   # the patched path with nothing changed: the engine's own error
    per_layer = {layer: sum(int(s.numel()) for s in sinks[0]) for layer, sinks in sorted(policy.sinks_found.items())}
    heads = sum(len(sinks[0]) for sinks in policy.sinks_found.values())
    found = [s for sinks in policy.sinks_found.values() for s in sinks[0]]
    print(f"ACT (beta={policy.beta}, tau={policy.tau}), SmolLM2-135M, {length} tokens of real text "
          f"(tasks.document_ids), perplexity on the last {tail}; {time.perf_counter() - start:.0f} s")
    print(f"non-initial sinks found per layer (summed over its 9 heads; {heads} calibrated heads, "
          f"{sum(1 for s in found if s.numel())} with a sink): " +
          " ".join(f"{layer}:{count}" for layer, count in per_layer.items()))
    positions = torch.cat([s for s in found if s.numel()]) if any(s.numel() for s in found) else torch.zeros(0)
    top = torch.bincount(positions.long()).topk(min(8, positions.numel())) if positions.numel() else None
    if top is not None:
        print("most frequent sink positions (heads): " + ", ".join(
            f"{int(p)} {tokenizer.decode(ids[0, int(p)])!r} ({int(c)})" for c, p in zip(top.values, top.indices)))
    ppl = lambda x: float(torch.exp(x.mean()))  # noqa: E731
    print(f"perplexity: unpatched {ppl(dense):.4f}; patched, nothing changed {ppl(keep_all):.4f}; "
          f"ACT {ppl(calibrated):.4f} (mean NLL delta vs unpatched {float((calibrated - dense).mean()):+.4f})")
    if not depths:
        return
    config = kv_eval.KVEvalConfig(lengths=(length,), depths=tuple(depths), ratios=(0.5,), decode_steps=0,
                                  verify=False)
    results = kv_eval.run_kv_eval(model, tokenizer, ["act"], config, progress=False)
    for row in results["rows"]:
        print(f"passkey at {length}, depths {depths}: {row['policy']}: "
              f"{sum(c['found'] for c in row['cells'])}/{len(row['cells'])}")


def run(args) -> None:
    """`blockattn eval --kv` with the knobs the CLI keeps fixed (decode steps, the end-to-end check)."""
    import time

    import blockattn
    from blockattn.bench import kv_eval
    config = kv_eval.KVEvalConfig(tasks=tuple(args.tasks), lengths=tuple(args.lengths), depths=tuple(args.depths),
                                  seeds=tuple(args.seeds), ratios=tuple(args.ratios), method=args.method,
                                  decode_steps=args.decode_steps, verify=not args.no_verify, needles=args.needles,
                                  time_dense=not args.no_dense_ttft)
    kv_eval.expand(args.kv, config.ratios)
    start = time.perf_counter()
    model, tokenizer = blockattn.models.load("smollm2-135m")
    results = kv_eval.run_kv_eval(model, tokenizer, args.kv, config, progress=False)
    results["model"], results["wall_seconds"] = "smollm2-135m", time.perf_counter() - start
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "kv_results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    merge(args.output, [os.path.join(args.output, "kv_results.json")])


def rss(spec: str | None, length: int) -> None:
    """One fresh process, one prefill: RSS before `model(context, use_cache=True)` and after (cache held)."""
    import gc

    import torch

    import blockattn
    from blockattn import hf, kv
    from blockattn.bench import tasks
    from blockattn.bench.harness import PeakRSS
    model, tokenizer = blockattn.models.load("smollm2-135m")
    q_len = len(tokenizer(" " + tasks.QUESTION.strip(), add_special_tokens=False).input_ids)
    context = tasks.passkey(tokenizer, length, 0.5, model=model).prompt[:, :-q_len]
    policy = kv.parse(spec) if spec else None
    patch = hf.patch(model, kv=policy) if policy is not None else None   # setup (RazorAttention's probe) first
    with torch.no_grad():
        model(context[:, :64], use_cache=False)                          # warm-up: one-time allocations
        gc.collect()
        before = PeakRSS.now() * 1024
        cache = model(context, use_cache=True, logits_to_keep=1).past_key_values
        gc.collect()
        after = PeakRSS.now() * 1024
    held = kv.cache_bytes(cache) / 2 ** 20
    print(f"{spec or 'unpatched (DynamicCache)'} at n = {context.shape[1]}: RSS before {before:.1f} MiB, after "
          f"{after:.1f} MiB, added {after - before:.1f} MiB; cache_bytes {held:.2f} MiB")
    if patch is not None:
        patch.__exit__(None, None, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="several kv_results.json as one table and plot")
    m.add_argument("out")
    m.add_argument("results", nargs="+")
    mem = sub.add_parser("memory", help="cache_bytes vs (1 − r) × dense and RSS added, from kv_results.json")
    mem.add_argument("results", nargs="+")
    a = sub.add_parser("act", help="ACT: sinks per layer, perplexity and passkey with vs without")
    a.add_argument("--length", type=int, default=2048)
    a.add_argument("--depths", type=float, nargs="*", default=[],
                   help="also passkey at these depths, ACT vs dense (default none: `blockattn eval --kv act` does it)")
    r = sub.add_parser("run", help="blockattn eval --kv on SmolLM2 with decode steps and the check selectable")
    r.add_argument("--kv", nargs="+", required=True)
    r.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    r.add_argument("--tasks", nargs="+", default=["passkey"])
    r.add_argument("--lengths", type=int, nargs="+", default=[4096])
    r.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--needles", type=int, default=4, help="multi_needle: facts per document, each asked once")
    r.add_argument("--method", default=None)
    r.add_argument("--decode-steps", type=int, default=4)
    r.add_argument("--no-verify", action="store_true")
    r.add_argument("--no-dense-ttft", action="store_true", help="skip the unpatched model's end-to-end prefill")
    r.add_argument("-o", "--output", required=True)
    q = sub.add_parser("rss", help="RSS before/after one end-to-end prefill in a fresh process")
    q.add_argument("--policy", default=None, help="a kv spec (default: the unpatched model)")
    q.add_argument("--length", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.command == "rss":
        rss(args.policy, args.length)
    elif args.command == "run":
        run(args)
    elif args.command == "merge":
        merge(args.out, args.results)
    elif args.command == "memory":
        from blockattn.bench import kv_eval
        parts = []
        for path in args.results:
            with open(path) as f:
                parts.append(json.load(f))
        print(memory_table(kv_eval.merge(parts) if len(parts) > 1 else parts[0]))
    else:
        act(args.length, args.depths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
