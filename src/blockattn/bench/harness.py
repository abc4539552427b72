"""The evaluation behind `blockattn eval`: passkey retrieval on a real model for dense and any registered
method, with per-method speed (prefill vs the unpatched SDPA model, timed in the same run, decode
tokens/s) and per-layer attention quality on captured q/k/v. Optional tasks: multi-needle retrieval,
long-document perplexity against the unpatched model, and encoder (MiniLM) embedding fidelity.

    results = run_eval(model, tokenizer, [("dense", {}), ("streaming", {"window": 512})],
                       lengths=[2048], depths=[0.1, 0.5, 0.9])
"""
from __future__ import annotations

import ast
import dataclasses
import time

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


TASKS = ("passkey", "multi_needle", "perplexity", "encoder")
ANSWER_ROOM = 16  # tokens after a retrieval prompt: the answer is scored in the same forward pass


@dataclasses.dataclass
class EvalConfig:
    tasks: tuple = ("passkey", "perplexity")
    lengths: tuple = (2048, 4096, 8000)  # prompt lengths: prompt + answer must fit SmolLM2's 8192 tokens
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    seeds: tuple = (0,)
    quality_layers: tuple = (0, 10, 20, 29)
    quality_length: int | None = None   # captured q/k/v length (default: the shortest task length)
    decode_prompt: int = 256
    decode_tokens: int = 8
    needles: int = 4                    # multi-needle: facts per document; each is asked once per length
    backend: str = "auto"
    budget_seconds: float | None = None  # methods that would end past it are not run (the first always runs)


def _check(model, config: EvalConfig):
    limit = getattr(model.config, "max_position_embeddings", None)
    for length in config.lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 64:
            raise ValueError(f"lengths must be ints >= 64, got {length!r}")
        if limit is not None and length + ANSWER_ROOM > limit:
            raise ValueError(f"length {length} leaves no room for the answer: prompt + answer (up to {ANSWER_ROOM} "
                             f"tokens) must fit the model's context of {limit} tokens; use at most "
                             f"{limit - ANSWER_ROOM}")
    for depth in config.depths:
        if not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
            raise ValueError(f"depths must be numbers in [0, 1], got {depth!r}")
    if not config.lengths or not config.depths or not config.seeds:
        raise ValueError("lengths, depths and seeds must each be non-empty")
    unknown = [t for t in config.tasks if t not in TASKS]
    if unknown or not config.tasks:
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {list(config.tasks)}")
    if not {"passkey", "multi_needle"} & set(config.tasks):
        raise ValueError("tasks must include 'passkey' or 'multi_needle' (the speed columns come from them)")


def _retrieval_samples(tokenizer, model, config: EvalConfig) -> list[tasks.Sample]:
    samples = []
    for length in config.lengths:
        for seed in config.seeds:
            if "passkey" in config.tasks:
                samples += [tasks.passkey(tokenizer, length, depth, seed=seed, model=model) for depth in config.depths]
            if "multi_needle" in config.tasks:
                samples += [tasks.multi_needle(tokenizer, length, needles=config.needles, ask=ask, seed=seed,
                                               model=model) for ask in range(config.needles)]
    return samples


def run_eval(model, tokenizer, methods: list[tuple[str, dict]], config: EvalConfig | None = None, *,
             progress: bool = True, encoder=None) -> dict:
    """Retrieval accuracy per (method, task, length, depth), speed and per-layer quality per method.

    Returns a JSON-ready dict: `{"config", "baseline": {length: sdpa prefill seconds}, "methods": [...]}`,
    each method with `accuracy` (per task in `task_accuracy`), `cells` (task, length, depth, found,
    seconds), `prefill_speedup` (SDPA time / method time, geometric mean over lengths),
    `decode_tokens_per_s`, density, layer quality and, when asked for, `perplexity` (against the
    unpatched model on real text at the quality length) and `encoder` (cosine of `encoder=(model,
    tokenizer)` embeddings with the method vs dense)."""
    from tqdm.auto import tqdm

    from blockattn import hf
    from blockattn.bench.capture import capture_qkv

    config = config or EvalConfig()
    _check(model, config)
    started = time.perf_counter()
    methods = [parse_method(m) if isinstance(m, str) else (m[0], dict(m[1])) for m in methods]
    if "encoder" in config.tasks and encoder is None:
        raise ValueError("task 'encoder' needs encoder=(model, tokenizer), e.g. blockattn.models.load('minilm-l6')")
    samples = _retrieval_samples(tokenizer, model, config)
    layers = [layer for layer in config.quality_layers if layer < model.config.num_hidden_layers]
    q_len = config.quality_length or min(config.lengths)
    per_method = len(samples) + 2 + ("perplexity" in config.tasks) + ("encoder" in config.tasks)
    steps = len(config.lengths) + ("perplexity" in config.tasks) + len(methods) * per_method
    bar = tqdm(total=steps, desc="blockattn eval", disable=not progress)

    def warm_up():  # first calls pay one-time costs (thread pools, allocator, kernel loading): not timed
        with torch.no_grad():
            model(input_ids=samples[0].prompt[:, :256], use_cache=False, logits_to_keep=1)

    warm_up()
    baseline = {}
    for length in config.lengths:
        # SDPA speed does not depend on where the needle is: one timed prefill per length
        sample = next(s for s in samples if s.length == length)
        baseline[length] = tasks.answer_found(model, sample)[1]
        bar.update()
    # every method reruns every prompt: say up front what that costs at the dense model's speed
    per_method_estimate = (sum(baseline[s.length] for s in samples) +
                           ("perplexity" in config.tasks) * baseline[min(config.lengths)])
    estimate = len(methods) * per_method_estimate
    if progress:
        budget = (f"; the {config.budget_seconds / 60:g}-min budget fits about "
                  f"{max(1, min(len(methods), int(config.budget_seconds // max(per_method_estimate, 1e-9))))}"
                  if config.budget_seconds else "")
        tqdm.write(f"blockattn eval: {len(methods)} methods x {len(samples)} prompts; at the unpatched model's "
                   f"prefill speed that is about {estimate / 60:.0f} min{budget} (--methods, --lengths, --depths "
                   f"or --quick make it shorter)")
    captured = capture_qkv(model, samples[0].prompt[:, :q_len] if samples[0].length >= q_len else
                           tasks.passkey(tokenizer, q_len, 0.5, model=model).prompt, layers=layers)
    decode_prompt = samples[0].prompt[:, :config.decode_prompt]
    if "perplexity" in config.tasks:
        text_ids = tasks.document_ids(tokenizer, q_len)
        dense_nll = tasks.token_nll(model, text_ids)  # the unpatched model is the reference
        bar.update()

    results = []
    for name, params in methods:
        entry = {"method": label(name, params), "name": name, "params": params, "cells": []}
        bar_at_start = bar.n
        if config.budget_seconds and results and \
                time.perf_counter() - started + per_method_estimate > config.budget_seconds:
            entry.update(skipped=f"not run: past the {config.budget_seconds / 60:g}-min time budget",
                         accuracy=float("nan"), task_accuracy={}, prefill_speedup=float("nan"))
            results.append(entry)
            bar.update(per_method)
            continue
        try:
            with hf.patch(model, name, backend=config.backend, **params) as handle:
                warm_up()
                handle.reset_stats()
                for sample in samples:
                    bar.set_postfix_str(f"{entry['method']} L={sample.length} d={sample.depth:g}")
                    found, seconds = tasks.answer_found(model, sample)
                    entry["cells"].append({"task": sample.task, "length": sample.length, "depth": sample.depth,
                                           "seed": sample.seed, "found": found, "seconds": seconds})
                    bar.update()
                if "perplexity" in config.tasks:
                    entry["perplexity"] = tasks.nll_comparison(dense_nll, tasks.token_nll(model, text_ids))
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
            if "encoder" in config.tasks:
                entry["encoder"] = _encoder_fidelity(encoder, name, params, config.backend)
                bar.update()
        except Exception as error:  # one broken method must not sink the whole evaluation
            entry["error"] = f"{type(error).__name__}: {error}"
            bar.update(bar_at_start + per_method - bar.n)  # the steps this method will not take
        cells = entry["cells"]
        entry["accuracy"] = sum(c["found"] for c in cells) / len(cells) if cells else float("nan")
        entry["task_accuracy"] = {task: sum(c["found"] for c in cells if c["task"] == task) /
                                  max(1, sum(c["task"] == task for c in cells))
                                  for task in dict.fromkeys(c["task"] for c in cells)}
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


def _encoder_fidelity(encoder, name: str, params: dict, backend: str) -> dict:
    """MiniLM-style embeddings with the method vs dense; causal-only methods cannot serve an encoder."""
    model, tokenizer = encoder
    try:
        return tasks.encoder_fidelity(model, tokenizer, name, backend=backend, **params)
    except ValueError as error:  # e.g. "builds causal layouts; it cannot serve a bidirectional model"
        return {"error": str(error)}


_COLUMN = {"passkey": "passkey", "multi_needle": "needles"}


def format_table(results: dict) -> str:
    """Markdown table: one row per method; retrieval columns per task and length, then the metrics."""
    lengths = results["config"]["lengths"]
    tasks_run = [t for t in results["config"].get("tasks", ("passkey",)) if t in _COLUMN]
    extra = [t for t in ("perplexity", "encoder") if t in results["config"].get("tasks", ())]
    columns = [(task, n) for task in tasks_run for n in lengths]
    head = ("| method | " + " | ".join(f"{_COLUMN[t]}@{n}" for t, n in columns) + " | accuracy | "
            + "".join({"perplexity": "ppl (dense -> method) | ", "encoder": "encoder cos (min) | "}[t] for t in extra)
            + "prefill speedup vs SDPA | decode tok/s | density | layer out. rel. err | attn recall | "
            "selection / attention |")
    width = len(columns) + len(extra) + 8
    lines = [head, "|" + "---|" * width]
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
    for entry in results["methods"]:
        if ("error" in entry or "skipped" in entry) and not entry["cells"]:
            why = entry.get("skipped") or f"failed: {entry['error'][:80]}"
            lines.append(f"| {entry['method']} | " + " | ".join("-" for _ in columns) +
                         f" | {why} |" + " |" * (width - len(columns) - 1))
            continue
        per_column = []
        for task, n in columns:
            found = [c["found"] for c in entry["cells"] if c.get("task", "passkey") == task and c["length"] == n]
            per_column.append(f"{sum(found)}/{len(found)}" if found else "-")
        extras = []
        if "perplexity" in extra:
            ppl = entry.get("perplexity", {})
            extras.append(f"{fmt(ppl.get('ppl_dense'), '.2f')} -> {fmt(ppl.get('ppl_method'), '.2f')}"
                          if ppl else "-")
        if "encoder" in extra:
            enc = entry.get("encoder", {})
            extras.append(f"{fmt(enc.get('min_cosine'), '.6f')}" if "min_cosine" in enc else "n/a (causal)")
        quality = entry.get("layer_quality", {})
        lines.append(f"| {entry['method']} | " + " | ".join(per_column) + f" | {fmt(entry['accuracy'], '.2f')} | "
                     + "".join(e + " | " for e in extras) +
                     f"{fmt(entry['prefill_speedup'], '.2f')}x | "
                     f"{fmt(entry.get('decode_tokens_per_s'), '.1f')} | {fmt(entry.get('density'), '.3f')} | "
                     f"{fmt(quality.get('output_error'), '.2e')} | {fmt(quality.get('recall'), '.4f')} | "
                     f"{fmt(entry.get('select_fraction'), '.3f')} |")
    failed = [e for e in results["methods"] if "error" in e and e["cells"]]
    lines += [""] * bool(failed) + [f"- {e['method']} stopped early: {e['error'][:200]}" for e in failed]
    return "\n".join(lines)
