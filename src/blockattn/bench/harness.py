"""The evaluation behind `blockattn eval`: passkey retrieval on a real model for dense and any registered
method, with per-method speed (prefill vs the unpatched SDPA model, timed in the same run, decode
tokens/s) and per-layer attention quality on captured q/k/v. Optional tasks: multi-needle retrieval,
facts in real prose (`retrieval_prose`: several needles in Python's documentation, one asked per depth),
long-document perplexity against the unpatched model, and encoder (MiniLM) embedding fidelity.

    results = run_eval(model, tokenizer, [("dense", {}), ("streaming", {"window": 512})],
                       lengths=[2048], depths=[0.1, 0.5, 0.9])
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time

import torch

from blockattn import methods as registry
from blockattn._registry import split_spec
from blockattn.bench import metrics, tasks


def parse_method(spec: str) -> tuple[str, dict]:
    """`"streaming"` or `"streaming:window=512,sink=4"` -> `("streaming", {"window": 512, "sink": 4})`;
    the name and parameters are checked against the registry."""
    name, params = split_spec(spec, "method")
    registry.get(name, **params)  # raises ValueError (unknown name, lists known ones) or TypeError (bad params)
    return name, params


def label(name: str, params: dict) -> str:
    return name + ("(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


TASKS = ("passkey", "multi_needle", "retrieval_prose", "perplexity", "encoder")
RETRIEVAL = ("passkey", "multi_needle", "retrieval_prose")  # tasks scored by answer tokens (the speed columns)
ANSWER_ROOM = 16  # tokens after a retrieval prompt: the answer is scored in the same forward pass


@dataclasses.dataclass
class EvalConfig:
    tasks: tuple = ("passkey", "perplexity")
    lengths: tuple | None = None        # prompt lengths; None: `default_lengths(model)`
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    seeds: tuple = (0,)
    quality_layers: tuple = (0, 10, 20, 29)  # on hybrid models the full-attention layers are used instead
    quality_length: int | None = None   # captured q/k/v length (default: the shortest task length)
    decode_prompt: int = 256
    decode_tokens: int = 8
    needles: int = 4                    # multi-needle: facts per document, each asked once per length;
    #                                     retrieval_prose: facts per prompt, one asked at each depth
    perplexity_tail: int = 1024         # perplexity: the last this many tokens of each length's document
    backend: str = "auto"
    budget_seconds: float | None = None  # methods that would end past it are not run (the first always runs)


def default_lengths(model) -> tuple:
    """8k/16k/32k for a 32k-context model (Gemma 3), else 2k/4k/8k (SmolLM2: prompt + answer fit 8192)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 8192
    if limit >= 32768:
        return (8192, 16384, 32000)
    return tuple(n for n in (2048, 4096, 8000) if n + ANSWER_ROOM <= limit) or (limit - ANSWER_ROOM,)


def full_attention_layers(model) -> list[int] | None:
    """The full-attention layers of a hybrid model (sliding and full layers), else None."""
    types = getattr(model.config, "layer_types", None)
    if not types or not {"sliding_attention", "full_attention"} <= set(types):
        return None
    return [i for i, t in enumerate(types) if t == "full_attention"]


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
    if not set(RETRIEVAL) & set(config.tasks):
        raise ValueError("tasks must include 'passkey' or 'multi_needle' or 'retrieval_prose' (the speed columns "
                         "come from them)")


def check_methods_run(model, methods: list[tuple[str, dict]], *, backend: str = "auto", tokens: int = 128):
    """Refuse, before any timed work, a method that cannot run on this model (a bidirectional-only
    layout on a causal model, a grid-only method, a bad backend): one short patched forward each."""
    from blockattn import hf
    ids = torch.arange(tokens).remainder(max(2, model.config.vocab_size - 1)).add(1).view(1, -1)
    for name, params in methods:
        try:
            with torch.no_grad(), hf.patch(model, name, backend=backend, **params):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        except Exception as error:
            raise ValueError(f"method {label(name, params)!r} cannot run on {type(model).__name__}: "
                             f"{type(error).__name__}: {error}") from error


class PeakRSS:
    """Peak resident memory (GiB) of this process while the block runs, sampled every `every` seconds
    from /proc (falls back to the process-lifetime peak where /proc is missing)."""

    def __init__(self, every: float = 0.02):
        self.every, self.gib = every, float("nan")

    @staticmethod
    def now() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
        except (OSError, ValueError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

    def __enter__(self):
        self._peak, self._done = self.now(), threading.Event()

        def sample():
            while not self._done.wait(self.every):
                self._peak = max(self._peak, self.now())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.gib = max(self._peak, self.now())
        return False


def _retrieval_samples(tokenizer, model, config: EvalConfig) -> list[tasks.Sample]:
    samples = []
    for length in config.lengths:
        for seed in config.seeds:
            if "passkey" in config.tasks:
                samples += [tasks.passkey(tokenizer, length, depth, seed=seed, model=model) for depth in config.depths]
            if "multi_needle" in config.tasks:
                samples += [tasks.multi_needle(tokenizer, length, needles=config.needles, ask=ask, seed=seed,
                                               model=model) for ask in range(config.needles)]
            if "retrieval_prose" in config.tasks:
                samples += [tasks.retrieval_prose(tokenizer, length, depth, needles=config.needles, seed=seed,
                                                  model=model) for depth in config.depths]
    return samples


def _geomean(values) -> float:
    values = [v for v in values if v == v]
    return float(torch.tensor(values, dtype=torch.float64).log().mean().exp()) if values else float("nan")


def run_eval(model, tokenizer, methods: list[tuple[str, dict]], config: EvalConfig | None = None, *,
             progress: bool = True, encoder=None) -> dict:
    """Retrieval accuracy per (method, task, length, depth), speed, memory and per-layer quality per method.

    Returns a JSON-ready dict: `{"config", "baseline_sdpa_seconds": {length: s}, "baseline_structure_seconds":
    {length: s}, "methods": [...]}`. Two speed baselines, timed in the same run: the unpatched model (SDPA)
    and blockattn's "structure only" model (`dense`: on a hybrid model its sliding layers run their band
    through the engine, full layers dense), so a method's own contribution is visible. Each method has
    `accuracy` (per task in `task_accuracy`), `cells` (task, length, depth, found, seconds), `per_length`
    (accuracy, prefill seconds, speedups over both baselines, perplexity, peak RSS), `prefill_speedup` and
    `prefill_speedup_structure` (geometric means over lengths), `decode_tokens_per_s`, `density` (of the
    full-attention layers on a hybrid model), `select_fraction`, `peak_rss_gib`, layer quality and, when
    asked for, `perplexity` (against the unpatched model, on the last `perplexity_tail` tokens of real text
    at each length; the top-level entry is the longest length's) and `encoder` (cosine of `encoder=(model,
    tokenizer)` embeddings with the method vs dense)."""
    from tqdm.auto import tqdm

    from blockattn import hf
    from blockattn.bench.capture import capture_qkv

    config = dataclasses.replace(config or EvalConfig())
    if config.lengths is None:
        config.lengths = default_lengths(model)
    _check(model, config)
    started = time.perf_counter()
    methods = [parse_method(m) if isinstance(m, str) else (m[0], dict(m[1])) for m in methods]
    if "encoder" in config.tasks and encoder is None:
        raise ValueError("task 'encoder' needs encoder=(model, tokenizer), e.g. blockattn.models.load('minilm-l6')")
    check_methods_run(model, methods, backend=config.backend)
    samples = _retrieval_samples(tokenizer, model, config)
    full_layers = full_attention_layers(model)
    layers = full_layers if full_layers is not None else \
        [layer for layer in config.quality_layers if layer < model.config.num_hidden_layers]
    q_len = config.quality_length or min(config.lengths)
    perplexity = "perplexity" in config.tasks
    structure_measured = not any(name == "dense" for name, _ in methods)
    per_method = len(samples) + 2 + perplexity * len(config.lengths) + ("encoder" in config.tasks)
    steps = (len(config.lengths) * (1 + structure_measured) + len(methods) * per_method)
    bar = tqdm(total=steps, desc="blockattn eval", disable=not progress)

    def warm_up():  # first calls pay one-time costs (thread pools, allocator, kernel loading): not timed
        with torch.no_grad():
            model(input_ids=samples[0].prompt[:, :256], use_cache=False, logits_to_keep=1)

    warm_up()
    baseline, baseline_rss, text_ids, dense_nll = {}, {}, {}, {}
    for length in config.lengths:
        # SDPA speed does not depend on where the needle is: one timed prefill per length (the perplexity
        # reference's decoder pass when perplexity is asked for, else a retrieval prompt)
        with PeakRSS() as rss:
            if perplexity:
                text_ids[length] = tasks.document_ids(tokenizer, length)
                dense_nll[length], baseline[length] = tasks.timed_token_nll(model, text_ids[length],
                                                                            tail=config.perplexity_tail)
            else:
                baseline[length] = tasks.answer_found(model, next(s for s in samples if s.length == length))[1]
        baseline_rss[length] = rss.gib
        bar.update()
    structure = {}
    if structure_measured:  # no "dense" row to take it from: one patched-dense prefill per length
        with hf.patch(model, "dense", backend=config.backend):
            warm_up()
            for length in config.lengths:
                structure[length] = tasks.answer_found(model, next(s for s in samples if s.length == length))[1]
                bar.update()
    # every method reruns every prompt: say up front what that costs at the dense model's speed
    per_method_estimate = (sum(baseline[s.length] for s in samples) + perplexity * sum(baseline.values()))
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

    results = []
    for name, params in methods:
        entry = {"method": label(name, params), "name": name, "params": params, "cells": [],
                 "within_block_lookahead": _lookahead(name, params)}
        bar_at_start = bar.n
        if config.budget_seconds and results and \
                time.perf_counter() - started + per_method_estimate > config.budget_seconds:
            entry.update(skipped=f"not run: past the {config.budget_seconds / 60:g}-min time budget",
                         accuracy=float("nan"), task_accuracy={}, prefill_speedup=float("nan"),
                         prefill_speedup_structure=float("nan"), per_length={})
            results.append(entry)
            bar.update(per_method)
            continue
        rss_by_length, ppl_by_length = {}, {}
        try:
            with hf.patch(model, name, backend=config.backend, **params) as handle:
                warm_up()
                handle.reset_stats()
                for sample in samples:
                    bar.set_postfix_str(f"{entry['method']} L={sample.length} d={sample.depth:g}")
                    with PeakRSS() as rss:
                        found, seconds = tasks.answer_found(model, sample)
                    rss_by_length[sample.length] = max(rss.gib, rss_by_length.get(sample.length, 0.0))
                    entry["cells"].append({"task": sample.task, "length": sample.length, "depth": sample.depth,
                                           "seed": sample.seed, "found": found, "seconds": seconds})
                    bar.update()
                if perplexity:
                    for length in config.lengths:
                        bar.set_postfix_str(f"{entry['method']} perplexity L={length}")
                        with PeakRSS() as rss:
                            nll, _ = tasks.timed_token_nll(model, text_ids[length], tail=config.perplexity_tail)
                        rss_by_length[length] = max(rss.gib, rss_by_length.get(length, 0.0))
                        ppl_by_length[length] = tasks.nll_comparison(dense_nll[length], nll)
                        bar.update()
                    entry["perplexity"] = ppl_by_length[max(config.lengths)]
                stats = handle.stats_of("full_attention" if full_layers is not None else None)
                entry["density"] = stats.density
                entry["density_all_layers"] = handle.stats.density
                total = handle.stats
                entry["select_fraction"] = total.select_seconds / max(total.select_seconds + total.attend_seconds,
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
        entry["per_length"] = {}
        for length in config.lengths:
            at = [c for c in cells if c["length"] == length]
            if at:
                entry["per_length"][length] = {
                    "accuracy": sum(c["found"] for c in at) / len(at),
                    "seconds": sum(c["seconds"] for c in at) / len(at),
                    "peak_rss_gib": rss_by_length.get(length, float("nan")),
                    **({"perplexity": ppl_by_length[length]} if length in ppl_by_length else {})}
        entry["peak_rss_gib"] = max(rss_by_length.values(), default=float("nan"))
        results.append(entry)
    bar.close()
    # the structure-only baseline is the dense row's own timing when dense was run
    dense_row = next((e for e in results if e["name"] == "dense" and e["per_length"]), None)
    if not structure_measured:
        structure = {n: v["seconds"] for n, v in dense_row["per_length"].items()} if dense_row else {}
    for entry in results:
        for length, row in entry.get("per_length", {}).items():
            row["speedup_sdpa"] = baseline[length] / row["seconds"]
            row["speedup_structure"] = structure[length] / row["seconds"] if length in structure else float("nan")
        rows = entry.get("per_length", {}).values()
        entry["prefill_speedup"] = _geomean([r["speedup_sdpa"] for r in rows])
        entry["prefill_speedup_structure"] = _geomean([r["speedup_structure"] for r in rows])
    return {"config": {**dataclasses.asdict(config), "quality_layers": layers, "quality_length": q_len},
            "hybrid_full_layers": full_layers, "baseline_sdpa_seconds": baseline,
            "baseline_sdpa_peak_rss_gib": baseline_rss, "baseline_structure_seconds": structure,
            "methods": results}


def _encoder_fidelity(encoder, name: str, params: dict, backend: str) -> dict:
    """MiniLM-style embeddings with the method vs dense; causal-only methods cannot serve an encoder."""
    model, tokenizer = encoder
    try:
        return tasks.encoder_fidelity(model, tokenizer, name, backend=backend, **params)
    except ValueError as error:  # e.g. "builds causal layouts; it cannot serve a bidirectional model"
        return {"error": str(error)}


_COLUMN = {"passkey": "passkey", "multi_needle": "needles", "retrieval_prose": "prose"}


def _lookahead(name: str, params: dict) -> bool:
    try:
        return bool(type(registry.get(name, **params)).within_block_lookahead)
    except (TypeError, ValueError):  # a results file from another version: unknown name or parameters
        return False


def lookahead_note(results: dict) -> str:
    """The footnote naming the methods whose numbers include within-block lookahead ('' if none)."""
    names = [e["method"] for e in results["methods"]
             if e.get("within_block_lookahead", _lookahead(e["name"], e.get("params", {})))]
    if not names:
        return ""
    return (f"Within-block lookahead: the numbers of {', '.join(names)} include it. These rules choose a "
            "query's keys for a whole query block (group, region, or from the prompt's last queries), so in "
            "a causal prompt later tokens can change the key sets of earlier tokens (never showing them a "
            "later key), as the official code does; a token-by-token decode would not see that.")


def format_table(results: dict) -> str:
    """Markdown table: one row per method; retrieval columns per task and length, then the metrics."""
    lengths = results["config"]["lengths"]
    tasks_run = [t for t in results["config"].get("tasks", ("passkey",)) if t in _COLUMN]
    extra = [t for t in ("perplexity", "encoder") if t in results["config"].get("tasks", ())]
    columns = [(task, n) for task in tasks_run for n in lengths]
    head = ("| method | " + " | ".join(f"{_COLUMN[t]}@{n}" for t, n in columns) + " | accuracy | "
            + "".join({"perplexity": "ppl (dense -> method) | ", "encoder": "encoder cos (min) | "}[t] for t in extra)
            + "prefill speedup vs SDPA | vs structure | decode tok/s | density | layer out. rel. err | attn recall | "
            "selection / attention | peak RSS GiB |")
    width = len(columns) + len(extra) + 10
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
                     f"{fmt(entry.get('prefill_speedup_structure'), '.2f')}x | "
                     f"{fmt(entry.get('decode_tokens_per_s'), '.1f')} | {fmt(entry.get('density'), '.3f')} | "
                     f"{fmt(quality.get('output_error'), '.2e')} | {fmt(quality.get('recall'), '.4f')} | "
                     f"{fmt(entry.get('select_fraction'), '.3f')} | {fmt(entry.get('peak_rss_gib'), '.2f')} |")
    failed = [e for e in results["methods"] if "error" in e and e["cells"]]
    lines += [""] * bool(failed) + [f"- {e['method']} stopped early: {e['error'][:200]}" for e in failed]
    note = lookahead_note(results)
    lines += ["", note] * bool(note)
    return "\n".join(lines)


def format_length_table(results: dict) -> str:
    """Markdown table, one row per (method, length): accuracy, perplexity delta, prefill seconds and speedups
    over the unpatched model (SDPA) and over blockattn's structure-only model, peak RSS. The first rows are
    the two baselines."""
    sdpa, structure = results["baseline_sdpa_seconds"], results.get("baseline_structure_seconds", {})
    rss = results.get("baseline_sdpa_peak_rss_gib", {})
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) and v == v else "-"  # noqa: E731
    lines = ["| method | L | accuracy | ppl dense -> method (NLL delta) | prefill s | vs SDPA | vs structure | "
             "peak RSS GiB |", "|" + "---|" * 8]
    for length in sdpa:
        lines.append(f"| unpatched (SDPA) | {length} | - | - | {fmt(sdpa[length], '.2f')} | 1.00x | "
                     f"{fmt(structure[length] / sdpa[length] if length in structure else None, '.2f')}x | "
                     f"{fmt(rss.get(length), '.2f')} |")
    for entry in results["methods"]:
        for length, row in entry.get("per_length", {}).items():
            ppl = row.get("perplexity")
            ppl_text = (f"{ppl['ppl_dense']:.3f} -> {ppl['ppl_method']:.3f} ({ppl['nll_delta_mean']:+.4f})"
                        if ppl else "-")
            lines.append(f"| {entry['method']} | {length} | {fmt(row['accuracy'], '.2f')} | {ppl_text} | "
                         f"{fmt(row['seconds'], '.2f')} | {fmt(row.get('speedup_sdpa'), '.2f')}x | "
                         f"{fmt(row.get('speedup_structure'), '.2f')}x | {fmt(row.get('peak_rss_gib'), '.2f')} |")
    note = lookahead_note(results)
    lines += ["", note] * bool(note)
    return "\n".join(lines)
