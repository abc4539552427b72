"""Gemma 3 270M long-context prefill: the unpatched model (SDPA) vs blockattn's "structure only" model
(`dense`: sliding layers run their 512-token band through the engine, full layers dense) vs methods on the
full-attention layers, at 8k/16k/32k tokens, with each run's peak RSS.

Each row is one prefill of real text (`logits_to_keep=1`: the 262k-entry LM head over every position
would be 34 GB at 32k), timed after one untimed warm-up; `--repeats` keeps the best. Ratios are against
the unpatched and structure-only rows of the same length in the same run. Also prints the last-position
logit difference of each row against the unpatched model.

    nice .venv/bin/python benchmarks/gemma3_prefill.py --dtype bf16 --lengths 8192 16384 32752 \
        --methods xattention vertical_slash --out docs/bench/gemma3_prefill.md
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch

from blockattn import hf, models
from blockattn.bench import harness, tasks


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32752])
    parser.add_argument("--methods", nargs="+", default=["xattention"],
                        help="method specs 'name' or 'name:key=value,...' run on the full-attention layers")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-sdpa", action="store_true", help="skip the unpatched rows (the slowest)")
    parser.add_argument("--out", default=None,
                        help="markdown file for the table (and a .json and a .png beside it)")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="only redraw the PNG from a saved .json (no model run)")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            print(plot(json.load(f), args.replot.rsplit(".", 1)[0] + ".png"))
        return 0
    specs = [harness.parse_method(spec) for spec in args.methods]  # bad specs fail before the model loads
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model, tokenizer = models.load("gemma3-270m", dtype=dtype)
    limit = model.config.max_position_embeddings
    for length in args.lengths:
        if length > limit:
            raise ValueError(f"length {length} exceeds Gemma 3's context of {limit} tokens")
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}",
          file=sys.stderr)

    def prefill(ids):
        best, logits = float("inf"), None
        for _ in range(args.repeats):
            with harness.PeakRSS() as rss:
                start = time.perf_counter()
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
                best = min(best, time.perf_counter() - start)
        return best, rss.gib, logits

    rows = []
    with torch.no_grad():
        model(input_ids=tasks.document_ids(tokenizer, 256), use_cache=False, logits_to_keep=1)  # warm-up
        for length in args.lengths:
            ids = tasks.document_ids(tokenizer, length)
            reference = None
            runs = ([] if args.no_sdpa else [("unpatched (SDPA)", None, {})]) + \
                [("dense (structure only)", "dense", {})] + [(harness.label(n, p), n, p) for n, p in specs]
            for row_name, name, params in runs:
                if name is None:
                    seconds, rss, logits = prefill(ids)
                    stats = None
                else:
                    with hf.patch(model, name, **params) as handle:
                        model(input_ids=ids[:, :256], use_cache=False, logits_to_keep=1)  # warm-up
                        handle.reset_stats()
                        seconds, rss, logits = prefill(ids)
                        stats = handle.stats_of("full_attention"), handle.stats
                reference = logits if reference is None else reference
                row = {"length": length, "row": row_name, "seconds": seconds, "peak_rss_gib": rss,
                       "logit_diff": float((logits - reference).norm() / reference.norm())}
                if stats is not None:
                    full, total = stats
                    row["density_full"] = full.density
                    row["select_share"] = total.select_seconds / max(total.select_seconds + total.attend_seconds,
                                                                     1e-12)
                    # Amdahl: what the full layers' attention (selection included) costs of the whole prefill
                    # bounds what any method on those layers can gain: 1 / (1 - share) when it costs nothing
                    row["full_share"] = (full.select_seconds + full.attend_seconds) / seconds
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    lines = [f"Gemma 3 270M prefill, {args.dtype}, {cpu_name()}, {torch.get_num_threads()} threads; "
             f"one prefill of real text per row (best of {args.repeats}), logits_to_keep=1", "",
             "| L | row | prefill s | vs SDPA | vs structure | density (full layers) | selection share | "
             "full layers' attention share of prefill | peak RSS GiB | last-logit rel. diff vs first row |",
             "|" + "---|" * 10]
    for row in rows:
        same = [r for r in rows if r["length"] == row["length"]]
        sdpa = next((r["seconds"] for r in same if r["row"].startswith("unpatched")), float("nan"))
        structure = next(r["seconds"] for r in same if r["row"].startswith("dense"))
        fmt = lambda v, f: format(v, f) if v == v else "-"  # noqa: E731
        vs_sdpa = fmt(sdpa / row["seconds"], ".2f") + "x" * (sdpa == sdpa)
        lines.append(f"| {row['length']} | {row['row']} | {row['seconds']:.2f} | {vs_sdpa}"
                     f" | {structure / row['seconds']:.2f}x | {fmt(row.get('density_full', float('nan')), '.3f')} | "
                     f"{fmt(row.get('select_share', float('nan')), '.3f')} | {fmt(row.get('full_share', float('nan')), '.3f')} | "
                     f"{row['peak_rss_gib']:.2f} | "
                     f"{row['logit_diff']:.2e} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        plot(rows, args.out.rsplit(".", 1)[0] + ".png")
    return 0


def plot(rows: list[dict], path: str) -> str:
    """Per length, each method's prefill speedup over the structure-only row, with the Amdahl bound that the
    structure-only row's full-layer attention share sets for any method on those layers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(len(lengths), 1, figsize=(8, 3.2 * len(lengths)), squeeze=False)
    for ax, length in zip(axes[:, 0], lengths):
        same = [r for r in rows if r["length"] == length]
        structure = next(r for r in same if r["row"].startswith("dense"))
        methods = [r for r in same if r is not structure and not r["row"].startswith("unpatched")]
        speedups = [structure["seconds"] / r["seconds"] for r in methods]
        ax.bar(range(len(methods)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
        ax.set_xticks(range(len(methods)), [r["row"] for r in methods], rotation=40, ha="right", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if "full_share" in structure:
            bound = 1 / (1 - structure["full_share"])
            ax.axhline(bound, color="tab:blue", linestyle="--",
                       label=f"Amdahl bound {bound:.2f}x (full layers {structure['full_share']:.0%} of prefill)")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_ylabel("prefill speedup vs structure only")
        ax.set_title(f"Gemma 3 270M, {length} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
