"""The evaluation behind `blockattn eval`: passkey retrieval on a real model for dense and any registered
method, with per-method speed (prefill vs the unpatched SDPA model, timed in the same run, decode
tokens/s) and per-layer attention quality on captured q/k/v.

    results = run_eval(model, tokenizer, [("dense", {}), ("streaming", {"window": 512})],
                       lengths=[2048], depths=[0.1, 0.5, 0.9])
"""
from __future__ import annotations

import ast
import dataclasses

import torch

from blockattn import methods as registry
from blockattn.bench import metrics, tasks


def parse_method(spec: str) -> tuple[str, dict]:
    """`"streaming"` or `"streaming:window=512,sink=4"` -> `("streaming", {"window": 512, "sink": 4})`;
    the name and parameters are checked against the registry."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"method spec must be a non-empty string like 'name' or 'name:key=value,...', got {spec!r}")
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"method parameter {item!r} in {spec!r} must look like key=value")
        try:
            params[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[key.strip()] = value.strip()
    registry.get(name, **params)  # raises ValueError (unknown name, lists known ones) or TypeError (bad params)
    return name, params


def label(name: str, params: dict) -> str:
    return name + ("(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


@dataclasses.dataclass
class EvalConfig:
    lengths: tuple = (2048, 4096, 8192)
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    seeds: tuple = (0,)
    quality_layers: tuple = (0, 10, 20, 29)
    quality_length: int | None = None   # captured q/k/v length (default: the shortest task length)
    decode_prompt: int = 256
    decode_tokens: int = 8
    backend: str = "auto"


def _check(model, config: EvalConfig):
    limit = getattr(model.config, "max_position_embeddings", None)
    for length in config.lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 64:
            raise ValueError(f"lengths must be ints >= 64, got {length!r}")
        if limit is not None and length > limit:
            raise ValueError(f"length {length} exceeds the model's context of {limit} tokens")
    for depth in config.depths:
        if not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
            raise ValueError(f"depths must be numbers in [0, 1], got {depth!r}")
    if not config.lengths or not config.depths or not config.seeds:
        raise ValueError("lengths, depths and seeds must each be non-empty")


def run_eval(model, tokenizer, methods: list[tuple[str, dict]], config: EvalConfig | None = None, *,
             progress: bool = True) -> dict:
    """Passkey accuracy per (method, length, depth), speed and per-layer quality per method.

    Returns a JSON-ready dict: `{"config", "baseline": {length: sdpa prefill seconds}, "methods": [...]}`,
    each method with `accuracy`, `cells` (length, depth, found, seconds), `prefill_speedup` (SDPA time /
    method time, geometric mean over lengths), `decode_tokens_per_s`, density and layer quality."""
    from tqdm.auto import tqdm

    from blockattn import hf
    from blockattn.bench.capture import capture_qkv

    config = config or EvalConfig()
    _check(model, config)
    methods = [parse_method(m) if isinstance(m, str) else (m[0], dict(m[1])) for m in methods]
    samples = [tasks.passkey(tokenizer, length, depth, seed=seed, model=model)
               for length in config.lengths for depth in config.depths for seed in config.seeds]
    layers = [layer for layer in config.quality_layers if layer < model.config.num_hidden_layers]
    q_len = config.quality_length or min(config.lengths)
    steps = len(config.lengths) + len(methods) * (len(samples) + 2)
    bar = tqdm(total=steps, desc="blockattn eval", disable=not progress)

    baseline = {}
    for length in config.lengths:
        # SDPA speed does not depend on where the needle is: one timed prefill per length
        sample = next(s for s in samples if s.length == length)
        baseline[length] = tasks.answer_found(model, sample)[1]
        bar.update()
    captured = capture_qkv(model, samples[0].prompt[:, :q_len] if samples[0].length >= q_len else
                           tasks.passkey(tokenizer, q_len, 0.5, model=model).prompt, layers=layers)
    decode_prompt = samples[0].prompt[:, :config.decode_prompt]

    results = []
    for name, params in methods:
        entry = {"method": label(name, params), "name": name, "params": params, "cells": []}
        try:
            with hf.patch(model, name, backend=config.backend, **params) as handle:
                for sample in samples:
                    bar.set_postfix_str(f"{entry['method']} L={sample.length} d={sample.depth:g}")
                    found, seconds = tasks.answer_found(model, sample)
                    entry["cells"].append({"length": sample.length, "depth": sample.depth, "seed": sample.seed,
                                           "found": found, "seconds": seconds})
                    bar.update()
                stats = handle.stats
                entry["density"] = stats.density
                entry["select_fraction"] = stats.select_seconds / max(stats.select_seconds + stats.attend_seconds,
                                                                      1e-12)
                entry["decode_tokens_per_s"] = metrics.decode_tokens_per_second(
                    model, decode_prompt, new_tokens=config.decode_tokens)
                bar.update()
            entry["layer_quality"] = metrics.layer_quality(registry.get(name, **params), captured,
                                                           backend=config.backend)
            bar.update()
        except Exception as error:  # one broken method must not sink the whole evaluation
            entry["error"] = f"{type(error).__name__}: {error}"
            bar.update(len(samples) + 2 - len(entry["cells"]))
        cells = entry["cells"]
        entry["accuracy"] = sum(c["found"] for c in cells) / len(cells) if cells else float("nan")
        ratios = []
        for length in config.lengths:
            times = [c["seconds"] for c in cells if c["length"] == length]
            if times:
                ratios.append(baseline[length] / (sum(times) / len(times)))
        entry["prefill_speedup"] = float(torch.tensor(ratios).log().mean().exp()) if ratios else float("nan")
        results.append(entry)
    bar.close()
    return {"config": {**dataclasses.asdict(config), "quality_layers": layers, "quality_length": q_len},
            "baseline_sdpa_seconds": baseline, "methods": results}


def format_table(results: dict) -> str:
    """Markdown table: one row per method."""
    lengths = results["config"]["lengths"]
    head = ("| method | " + " | ".join(f"passkey@{n}" for n in lengths) + " | accuracy | prefill speedup vs SDPA | "
            "decode tok/s | density | layer out. rel. err | attn recall | selection / attention |")
    lines = [head, "|" + "---|" * (len(lengths) + 8)]
    for entry in results["methods"]:
        if "error" in entry and not entry["cells"]:
            lines.append(f"| {entry['method']} | " + " | ".join("-" for _ in lengths) +
                         f" | failed: {entry['error'][:80]} | | | | | | |")
            continue
        per_length = []
        for n in lengths:
            cells = [c["found"] for c in entry["cells"] if c["length"] == n]
            per_length.append(f"{sum(cells)}/{len(cells)}" if cells else "-")
        quality = entry.get("layer_quality", {})
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {entry['method']} | " + " | ".join(per_length) +
                     f" | {fmt(entry['accuracy'], '.2f')} | {fmt(entry['prefill_speedup'], '.2f')}x | "
                     f"{fmt(entry.get('decode_tokens_per_s'), '.1f')} | {fmt(entry.get('density'), '.3f')} | "
                     f"{fmt(quality.get('output_error'), '.2e')} | {fmt(quality.get('recall'), '.4f')} | "
                     f"{fmt(entry.get('select_fraction'), '.3f')} |")
    return "\n".join(lines)
