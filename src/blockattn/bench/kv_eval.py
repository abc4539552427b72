"""The evaluation behind `blockattn eval --kv`: KV-cache policies on a real model. Per policy and
compression ratio: retrieval accuracy (passkey, multi-needle), the KV bytes the cache really holds
(`blockattn.kv.cache_bytes`) and the resident memory it adds, time to first token, decode tokens/s.

    results = run_kv_eval(model, tokenizer, ["knorm", "razor:probe_period=1000"],
                          KVEvalConfig(lengths=(4096,), ratios=(0.5, 0.7, 0.9)))

Protocol (kvpress's query-agnostic one, completion form). Each prompt is split into its context (the
document with the needle) and its question ("... The pass key is"): the context is prefilled, the policy
compresses that prefill's K/V, then the question is fed as one chunk and the answer scored token by token
(teacher forcing, every answer token must be the greedy argmax) from the compressed cache, so the answer
comes from attention over the kept tokens only. A policy that sweeps (one with a `ratio` the spec does
not fix) runs at every ratio.

The context is prefilled once (with `method`, through the patched model, keeping everything) and its
per-layer K/V handed to every policy's `select`, exactly what `hf.patch(model, method, kv=policy)` does
after its own prefill; with `verify`, one compressing policy also runs end to end on the first context
and must give the same cache. On a hybrid model (Gemma 3) the sliding layers keep their window
(`window_selection`) and the policy selects on the full layers only, as the patch does; the dense row's
bytes count every layer at full length. Policies that change the prefill itself (ACT) run end to end.
Multi-needle questions about one document share its prefill (several questions, one context, as kvpress's
pipeline): the document built for the first question, holding every fact, serves them all.

Time to first token = the context prefill + the policy's selection + the question chunk. For the dense
row (the unpatched model over a transformers DynamicCache) it is measured end to end once per length;
for policies it is the shared prefill's time plus their own selection and question times (the real path
does exactly these three steps). Decode tokens/s: `decode_steps` greedy steps after the answer, in the
same run as the dense row's, so ratios between rows are meaningful; absolute values are the machine's.
RSS added: resident memory after building the compressed cache minus before (garbage collected both
times); exact only when freed buffers go back to the OS (glibc: `MALLOC_MMAP_THRESHOLD_=65536`).
"""
from __future__ import annotations

import dataclasses
import gc
import time

import torch

from blockattn import kv
from blockattn._registry import split_spec
from blockattn.bench import tasks
from blockattn.kv.base import Policy, Selection, check_ratio

TASKS = ("passkey", "multi_needle")
ANSWER_ROOM = 16  # tokens after the prompt: the answer and (some of) the timed decode steps
_COLUMN = {"passkey": "passkey", "multi_needle": "needles"}


@dataclasses.dataclass
class KVEvalConfig:
    tasks: tuple = ("passkey",)
    lengths: tuple = (4096,)
    depths: tuple = (0.1, 0.5, 0.9)     # passkey needle depths
    seeds: tuple = (0,)
    needles: int = 4                    # multi-needle: facts per document, each asked once
    ratios: tuple = (0.5, 0.7, 0.9)     # fractions of the cache removed, for policies that sweep
    method: str | None = None           # prefill method spec ("xattention", ...); None: dense
    decode_steps: int = 4
    backend: str = "auto"
    verify: bool = True                 # one compressing policy end to end on the first context
    time_dense: bool = True             # the unpatched model's TTFT end to end (one more prefill per length)


def label(name: str, params: dict) -> str:
    return name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")


def check_ratios(ratios) -> tuple[float, ...]:
    """Every ratio a float in [0, 1) (the fraction of the cache removed)."""
    if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__"):
        raise TypeError(f"ratios must be a sequence of floats in [0, 1), got {ratios!r}")
    out = []
    for ratio in ratios:
        try:
            out.append(check_ratio(ratio))
        except (TypeError, ValueError) as error:
            raise type(error)(f"ratios: {error}") from None
    if not out:
        raise ValueError("ratios must be non-empty")
    return tuple(out)


def expand(specs, ratios) -> list[tuple[str, str, dict]]:
    """Policy specs -> `(label, name, params)` rows, each policy that sweeps once per ratio. Every row is
    constructed once, so an unknown name (the error lists the known ones), a bad parameter or a bad
    ratio fails here, before any model work."""
    ratios = check_ratios(ratios)
    if isinstance(specs, (str, Policy)) or not specs:
        raise ValueError(f"kv policies must be a non-empty list of specs like 'razor' or 'knorm:ratio=0.5', "
                         f"got {specs!r}")
    rows = []
    for spec in specs:
        name, params = split_spec(spec, "kv policy")
        try:
            policy = kv.get(name, **params)
        except ValueError:
            if "ratio" in params:
                raise
            try:   # a policy that needs a ratio or a plan (MoA without a plan): the sweep gives the ratio
                policy = kv.get(name, **params, ratio=ratios[0])
            except (TypeError, ValueError):
                policy = None
            if policy is None:
                raise
        fields = {f.name for f in dataclasses.fields(policy)}
        sweep = policy.compresses and "ratio" in fields and "ratio" not in params
        for ratio in ratios if sweep else [None]:
            row = dict(params, **({"ratio": ratio} if ratio is not None else {}))
            kv.get(name, **row)
            rows.append((label(name, row), name, row))
    return rows


@dataclasses.dataclass
class Capture(Policy):
    """Records every layer's prefill (last 64 queries, keys, values, scale), sliding layers of a hybrid
    model included, and each sliding layer's window (`windows`): it observes the patch's prefill (the same
    attention the cache path runs) rather than selecting, since sliding layers never reach a policy."""
    compresses = False

    def __post_init__(self):
        self.layers = {}
        self.windows = {}   # sliding layer -> its window (Gemma 3); empty on a model without sliding layers

    def setup(self, model, runtime):
        from blockattn.kv._hf import ATTR
        self.windows = {m.layer_idx: int(m.sliding_window) for m in model.modules()
                        if getattr(m, ATTR, None) is runtime and getattr(m, "sliding_window", None)}
        runtime.observer = self.observe

    def observe(self, layer, query, key, value, scale):
        self.layers[layer] = (query[:, :, -64:].clone(), key, value, scale)

    def select(self, layer, query, key, value, scale):
        self.observe(layer, query, key, value, scale)
        batch, heads, n, _ = key.shape
        return Selection([torch.arange(n, device=key.device).expand(batch, n)] * heads)


def build_cache(policy: Policy, captured: dict, n: int, windows: dict | None = None):
    """The `KVCache` that `hf.patch(kv=policy)` would hold after a prefill whose K/V were `captured`:
    a layer in `windows` (a hybrid model's sliding layer -> its window) keeps its window as the patch's
    sliding layers do (`window_selection`), the policy selects on the others (`Runtime.policy_layers`)."""
    from blockattn.kv._hf import _store, window_selection
    from blockattn.kv.cache import KVCache, KVLayer
    windows = windows or {}
    cache = KVCache(policy)
    for layer in sorted(captured):
        q, k, v, scale = captured[layer]
        state = KVLayer()
        state.lazy_initialization(k, v)
        state.seen = n
        selection = window_selection(k, windows[layer]) if layer in windows else policy.select(layer, q, k, v, scale)
        _store(state, selection, k, v)
        cache.layers.append(state)
    return cache


def dense_cache(captured: dict):
    from transformers import DynamicCache
    cache = DynamicCache()
    for layer in sorted(captured):
        _, k, v, _ = captured[layer]
        cache.update(k, v, layer)
    return cache


def clone_cache(cache):
    """A copy of a `KVCache` that decoding can extend without touching the original (buffers are replaced,
    never written in place, so the tensors are shared)."""
    import copy
    out = copy.copy(cache)
    out.scratch = dict(cache.scratch)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        for key, value in vars(layer).items():
            if isinstance(value, list):
                setattr(new, key, list(value))
        out.layers.append(new)
    return out


@torch.no_grad()
def score(model, cache, question, answer, steps: int) -> tuple[bool, float, float]:
    """(every answer token greedy-correct, seconds of the question chunk, decode tokens/s over `steps`)."""
    start = time.perf_counter()
    out = model(question, past_key_values=cache, use_cache=True)
    first = time.perf_counter() - start
    ok = int(out.logits[0, -1].argmax()) == int(answer[0, 0])
    for t in range(answer.shape[1]):
        out = model(answer[:, t:t + 1], past_key_values=cache, use_cache=True)
        if t + 1 < answer.shape[1]:
            ok = ok and int(out.logits[0, -1].argmax()) == int(answer[0, t + 1])
    if steps < 1:
        return bool(ok), first, float("nan")
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return bool(ok), first, steps / (time.perf_counter() - start)


def question_length(tokenizer, ids) -> int:
    """Tokens of the trailing "\\nQuestion: ..." of a multi-needle prompt."""
    for back in range(1, min(64, len(ids))):
        if tokenizer.decode(ids[-back:]).lstrip(" ").startswith("\nQuestion"):
            return back
    raise ValueError("no trailing question found in the multi-needle prompt")


@dataclasses.dataclass
class Context:
    """One document to prefill and the questions asked about it: `(task, depth, seed, question, answer)`."""
    length: int
    ids: torch.Tensor
    questions: list


def contexts(tokenizer, model, config: KVEvalConfig) -> list[Context]:
    out = []
    q_ids = tokenizer(" " + tasks.QUESTION.strip(), add_special_tokens=False).input_ids
    for length in config.lengths:
        for seed in config.seeds:
            if "passkey" in config.tasks:
                for depth in config.depths:
                    s = tasks.passkey(tokenizer, length, depth, seed=seed, model=model)
                    cut = s.prompt.shape[1] - len(q_ids)
                    assert s.prompt[0, cut:].tolist() == q_ids
                    out.append(Context(length, s.prompt[:, :cut], [("passkey", depth, seed, s.prompt[:, cut:],
                                                                     s.answer)]))
            if "multi_needle" in config.tasks:
                group = None
                for ask in range(config.needles):
                    s = tasks.multi_needle(tokenizer, length, needles=config.needles, ask=ask, seed=seed, model=model)
                    cut = s.prompt.shape[1] - question_length(tokenizer, s.prompt[0])
                    entry = ("multi_needle", s.depth, seed, s.prompt[:, cut:], s.answer)
                    if group is None:
                        group = Context(length, s.prompt[:, :cut], [])
                        out.append(group)
                    # the document (same facts, same text) built for the first question serves them all; its
                    # length differs from the others' by the difference in question lengths (a token or two)
                    group.questions.append(entry)
    return out


def _check(model, config: KVEvalConfig):
    limit = getattr(model.config, "max_position_embeddings", None)
    if not config.lengths or not config.seeds or ("passkey" in config.tasks and not config.depths):
        raise ValueError("lengths, seeds and (for passkey) depths must each be non-empty")
    for length in config.lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 64:
            raise ValueError(f"lengths must be ints >= 64, got {length!r}")
        if limit is not None and length + ANSWER_ROOM > limit:
            raise ValueError(f"length {length} leaves no room for the answer and decode steps: use at most "
                             f"{limit - ANSWER_ROOM} (the model's context is {limit})")
    for depth in config.depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
            raise ValueError(f"depths must be numbers in [0, 1], got {depth!r}")
    if not config.tasks or any(t not in TASKS for t in config.tasks):
        raise ValueError(f"kv evaluation tasks must be a non-empty subset of {list(TASKS)}, got {list(config.tasks)}")
    if isinstance(config.decode_steps, bool) or not isinstance(config.decode_steps, int) or \
            not 0 <= config.decode_steps <= ANSWER_ROOM - 8:
        raise ValueError(f"decode_steps must be an int in [0, {ANSWER_ROOM - 8}], got {config.decode_steps!r}")


def _rss_mib() -> float:
    from blockattn.bench.harness import PeakRSS
    gc.collect()
    return PeakRSS.now() * 1024


def _changes_prefill(policy: Policy) -> bool:
    return type(policy).prefill_attend is not Policy.prefill_attend


def run_kv_eval(model, tokenizer, policies, config: KVEvalConfig | None = None, *, progress: bool = True) -> dict:
    """Accuracy, KV bytes held, RSS added, time to first token and decode tokens/s per policy row (see the
    module docstring). `policies`: specs ("knorm", "razor:probe_period=1000", "tidaldecode:top_k=256");
    each one with a `ratio` it does not fix runs at every `config.ratios`.

    Returns a JSON-ready dict `{"config", "dense_kv_bytes": {length: bytes}, "prefill_seconds":
    {length: s}, "verified": label or None, "rows": [...]}`; each row has `policy`, `name`, `params`,
    `ratio`, `cells` (task, length, depth, seed, found, kv_bytes, kv_fraction, rss_mib, ttft_s,
    decode_tokens_per_s), `error` (why it could not run, e.g. a budget below its sinks) and the means
    `accuracy`, `task_accuracy`, `kv_fraction`, `per_length` {length: accuracy per task, kv_mib,
    kv_fraction, rss_mib, ttft_s, decode_tokens_per_s, decode_vs_dense}. The first row is dense."""
    from tqdm.auto import tqdm

    from blockattn import hf
    from blockattn.bench.harness import parse_method

    config = dataclasses.replace(config or KVEvalConfig())
    config.ratios = check_ratios(config.ratios)
    _check(model, config)
    specs = expand(policies, config.ratios)
    method, method_params = parse_method(config.method) if config.method else ("dense", {})
    patch = lambda policy: hf.patch(model, method, kv=policy, backend=config.backend, **method_params)  # noqa: E731

    rows = [{"policy": "dense (unpatched, DynamicCache)", "name": "dense", "params": {}, "ratio": 0.0,
             "cells": [], "error": None}]
    policy_of = {}
    razor_heads = {}
    for text, name, params in specs:
        row = {"policy": text, "name": name, "params": params, "ratio": params.get("ratio"), "cells": [],
               "error": None}
        rows.append(row)
        shared = tuple(sorted((k, repr(v)) for k, v in params.items() if k != "ratio"))
        if name == "razor" and "retrieval_heads" not in params and shared in razor_heads:
            params = dict(params, retrieval_heads=razor_heads[shared])  # the probe does not depend on the ratio
        policy = kv.get(name, **params)
        try:
            with patch(policy):   # setup: RazorAttention's probe, a MoA plan's shape
                pass
        except ValueError as error:
            row["error"] = str(error)
            continue
        if name == "razor":
            razor_heads[shared] = policy.retrieval_heads
        row["note"] = getattr(policy, "note", None)   # e.g. razor with every governed head retrieval
        policy_of[text] = policy

    work = contexts(tokenizer, model, config)
    bar = tqdm(total=sum(len(c.questions) for c in work) * len(rows), desc="blockattn eval --kv",
               disable=not progress)
    dense_bytes, prefill_seconds, dense_ttft, verified, end_to_end = {}, {}, {}, None, {}
    for index, ctx in enumerate(work):
        n = ctx.ids.shape[1]
        capture = Capture()
        start = time.perf_counter()
        with torch.no_grad(), patch(capture):   # observed, not cached: no second copy of the K/V
            model(ctx.ids, use_cache=False, logits_to_keep=1)
        prefill = time.perf_counter() - start
        prefill_seconds.setdefault(ctx.length, prefill)
        dense_bytes[ctx.length] = sum(2 * k.numel() * k.element_size() for _, k, _, _ in capture.layers.values())
        if config.time_dense and ctx.length not in dense_ttft:   # the baseline's TTFT, end to end (unpatched)
            _, question, answer = ctx.questions[0][0], ctx.questions[0][3], ctx.questions[0][4]
            with torch.no_grad():
                before = _rss_mib()
                start = time.perf_counter()
                past = model(ctx.ids, use_cache=True, logits_to_keep=1).past_key_values
                held = _rss_mib() - before
                model(question, past_key_values=past, use_cache=True, logits_to_keep=1)
                dense_ttft[ctx.length] = time.perf_counter() - start
            end_to_end.setdefault(ctx.length, {})["dense (unpatched, DynamicCache)"] = {
                "kv_bytes": kv.cache_bytes(past), "rss_mib": held}
            del past
        if config.verify and index == 0:
            verified = _verify(model, ctx, capture, rows, policy_of, patch, end_to_end.setdefault(ctx.length, {}))
        prefilled = {}
        for row in rows[1:]:   # policies that change the prefill itself run it end to end, once per context
            policy = policy_of.get(row["policy"])
            if policy is not None and not row["error"] and _changes_prefill(policy):
                try:
                    with torch.no_grad(), patch(policy):
                        before = _rss_mib()
                        start = time.perf_counter()
                        cache = model(ctx.ids, use_cache=True, logits_to_keep=1).past_key_values
                        prefilled[row["policy"]] = (cache, time.perf_counter() - start, _rss_mib() - before)
                except Exception as error:  # one policy that cannot run must not sink the evaluation
                    row["error"] = f"{type(error).__name__}: {error}"
        for task, depth, seed, question, answer in ctx.questions:
            for row in rows:
                bar.update()
                if row["error"]:
                    continue
                cell = {"task": task, "length": ctx.length, "depth": depth, "seed": seed}
                try:
                    if row["name"] == "dense" and row is rows[0]:
                        cache = dense_cache(capture.layers)
                        cell["kv_bytes"], cell["rss_mib"] = kv.cache_bytes(cache), float("nan")
                        cell["found"], first, cell["decode_tokens_per_s"] = score(model, cache, question, answer,
                                                                                   config.decode_steps)
                        cell["ttft_s"] = dense_ttft.get(ctx.length, float("nan"))
                    else:
                        policy = policy_of[row["policy"]]
                        with patch(policy):
                            if row["policy"] in prefilled:
                                base, seconds, cell["rss_mib"] = prefilled[row["policy"]]
                                cache = clone_cache(base)
                            else:
                                before = _rss_mib()
                                start = time.perf_counter()
                                cache = build_cache(policy, capture.layers, n, capture.windows)
                                seconds = prefill + time.perf_counter() - start
                                cell["rss_mib"] = _rss_mib() - before
                            cell["kv_bytes"] = kv.cache_bytes(cache)
                            cell["found"], first, cell["decode_tokens_per_s"] = score(model, cache, question, answer,
                                                                                       config.decode_steps)
                        cell["ttft_s"] = seconds + first
                except Exception as error:  # e.g. a budget below the policy's sinks + window at this length
                    row["error"] = f"{type(error).__name__}: {error}"
                    continue
                finally:
                    cache = None
                cell["dense_bytes"] = dense_bytes[ctx.length]
                cell["kv_fraction"] = cell["kv_bytes"] / cell["dense_bytes"]
                row["cells"].append(cell)
        del capture, prefilled
    bar.close()
    _summarise(rows, config)
    return {"config": {**dataclasses.asdict(config), "method": config.method or "dense"},
            "dense_kv_bytes": dense_bytes, "prefill_seconds": prefill_seconds, "verified": verified,
            "end_to_end": end_to_end, "rows": rows}


def _verify(model, ctx, capture, rows, policy_of, patch, record):
    """The shortcut equals the real path: the first compressing policy, end to end through the model (its
    bytes and the resident memory its cache adds go to `record`)."""
    for row in rows[1:]:
        policy = policy_of.get(row["policy"])
        if policy is None or row["error"] or not policy.compresses or _changes_prefill(policy):
            continue
        with torch.no_grad(), patch(policy):
            try:
                before = _rss_mib()
                real = model(ctx.ids, use_cache=True, logits_to_keep=1).past_key_values
                record[row["policy"]] = {"kv_bytes": kv.cache_bytes(real), "rss_mib": _rss_mib() - before}
                shortcut = build_cache(policy, capture.layers, ctx.ids.shape[1], capture.windows)
            except ValueError:
                continue   # this policy cannot run at this length; its row records why
        same = real.lengths() == shortcut.lengths() and all(
            torch.equal(a, b) for x, y in zip(real.layers, shortcut.layers) for a, b in zip(x.positions, y.positions))
        if not same:
            raise AssertionError(f"kv eval: {row['policy']} end to end keeps other tokens than the shared-prefill "
                                 "shortcut")
        return row["policy"]
    return None


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def _summarise(rows, config):
    dense = rows[0]
    for row in rows:
        cells = row["cells"]
        row["accuracy"] = _mean([c["found"] for c in cells])
        row["task_accuracy"] = {t: _mean([c["found"] for c in cells if c["task"] == t]) for t in config.tasks}
        row["kv_fraction"] = _mean([c["kv_fraction"] for c in cells])
        row["per_length"] = {}
        for length in config.lengths:
            at = [c for c in cells if c["length"] == length]
            if not at:
                continue
            tps = _mean([c["decode_tokens_per_s"] for c in at])
            dense_tps = _mean([c["decode_tokens_per_s"] for c in dense["cells"] if c["length"] == length])
            row["per_length"][length] = {
                **{t: _mean([c["found"] for c in at if c["task"] == t]) for t in config.tasks},
                "kv_mib": _mean([c["kv_bytes"] for c in at]) / 2 ** 20,
                "kv_fraction": _mean([c["kv_fraction"] for c in at]),
                "rss_mib": _mean([c["rss_mib"] for c in at]),
                "ttft_s": _mean([c["ttft_s"] for c in at]),
                "decode_tokens_per_s": tps, "decode_vs_dense": tps / dense_tps if dense_tps else float("nan")}


def merge(parts: list[dict]) -> dict:
    """Several runs of the same policies (e.g. one per depth, to keep each run short) as one result."""
    if not parts:
        raise ValueError("merge needs at least one result")
    out = {**parts[0], "rows": [dict(r, cells=list(r["cells"])) for r in parts[0]["rows"]]}
    config = dict(parts[0]["config"])
    for part in parts[1:]:
        if [r["policy"] for r in part["rows"]] != [r["policy"] for r in out["rows"]]:
            raise ValueError("merge: the runs evaluated different policies")
        for row, other in zip(out["rows"], part["rows"]):
            row["cells"] += other["cells"]
            row["error"] = row["error"] or other["error"]
        for key in ("lengths", "depths", "seeds", "tasks"):
            config[key] = list(dict.fromkeys([*config[key], *part["config"][key]]))
    config["lengths"] = [int(n) for n in config["lengths"]]
    out["config"] = config
    out["parts"] = len(parts)
    _summarise(out["rows"], argparse_like(config))
    return out


def argparse_like(config: dict):
    return dataclasses.replace(KVEvalConfig(), tasks=tuple(config["tasks"]), lengths=tuple(config["lengths"]))


def format_table(results: dict) -> str:
    """Markdown: one row per policy and ratio; accuracy per task and length, then (at the longest length)
    KV held / dense, KV MiB, RSS added, time to first token, decode tokens/s and its ratio to dense."""
    config = results["config"]
    lengths = list(config["lengths"])
    top = max(lengths)
    columns = [(t, n) for t in config["tasks"] for n in lengths]
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) and v == v else "-"  # noqa: E731
    head = ("| policy | " + " | ".join(f"{_COLUMN[t]}@{n}" for t, n in columns) +
            f" | KV held / dense | KV MiB @{top} | RSS added MiB | TTFT s @{top} | decode tok/s @{top} | "
            "decode vs dense |")
    lines = [head, "|" + "---|" * (len(columns) + 7)]
    for row in results["rows"]:
        per_column = []
        for task, n in columns:
            found = [c["found"] for c in row["cells"] if c["task"] == task and c["length"] == n]
            per_column.append(f"{sum(found)}/{len(found)}" if found else "-")
        at = row.get("per_length", {}).get(top, {})
        if row["error"] and not row["cells"]:
            lines.append(f"| {row['policy']} | " + " | ".join(per_column) +
                         f" | n/a: {row['error'][:110]} |" + " |" * 5)
            continue
        lines.append(f"| {row['policy']} | " + " | ".join(per_column) +
                     f" | {fmt(row['kv_fraction'], '.3f')} | {fmt(at.get('kv_mib'), '.1f')} | "
                     f"{fmt(at.get('rss_mib'), '.1f')} | {fmt(at.get('ttft_s'), '.2f')} | "
                     f"{fmt(at.get('decode_tokens_per_s'), '.2f')} | {fmt(at.get('decode_vs_dense'), '.2f')}x |")
    stopped = [r for r in results["rows"] if r["error"] and r["cells"]]
    noted = [r for r in results["rows"] if r.get("note")]
    lines += [""] * bool(stopped or noted) + [f"- {r['policy']} stopped early: {r['error'][:200]}" for r in stopped]
    lines += [f"- {r['policy']}: {r['note'][:200]}" for r in noted]
    return "\n".join(lines)


def plot(results: dict, path: str) -> str:
    """Accuracy against measured compression, one line per policy (`eval_plots.kv_accuracy`)."""
    from blockattn.bench.eval_plots import kv_accuracy
    return kv_accuracy(results, path)


DEFAULT_TASKS = ["passkey", "perplexity"]   # `blockattn eval`'s own default, which --kv reads as passkey


def main(args) -> int:
    """`blockattn eval --kv ...` (the options of `commands/eval.py`): everything is checked before the model
    loads; writes kv_results.json, kv_table.md and kv_accuracy.png under `--output`."""
    import json
    import os

    from blockattn import models
    from blockattn.bench.harness import parse_method
    from blockattn.commands.eval import DTYPES

    if args.methods:
        raise ValueError("--kv evaluates cache policies; give the prefill method with --method, not --methods")
    task_list = ["passkey"] if list(args.tasks) == DEFAULT_TASKS else list(args.tasks)
    if any(t not in TASKS for t in task_list):
        raise ValueError(f"--tasks with --kv must be among {list(TASKS)}, got {task_list}")
    config = KVEvalConfig(tasks=tuple(task_list), seeds=tuple(args.seeds), ratios=check_ratios(args.ratios),
                          method=args.method, backend=args.backend)
    if getattr(args, "quick", False):
        config.lengths = (1024,)
    if args.lengths:
        config.lengths = tuple(args.lengths)
    if args.depths:
        config.depths = tuple(args.depths)
    expand(args.kv, config.ratios)          # unknown policies, bad parameters: before the model loads
    if config.method:
        parse_method(config.method)

    import torch
    start = time.perf_counter()
    model, tokenizer = models.load(args.model, dtype=getattr(torch, DTYPES[getattr(args, "dtype", "fp32")]))
    results = run_kv_eval(model, tokenizer, args.kv, config, progress=not args.no_progress)
    results["model"] = str(args.model)
    results["wall_seconds"] = time.perf_counter() - start
    os.makedirs(args.output, exist_ok=True)
    table = format_table(results)
    with open(os.path.join(args.output, "kv_results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.output, "kv_table.md"), "w") as f:
        f.write(table + "\n")
    png = plot(results, os.path.join(args.output, "kv_accuracy.png"))
    print(table)
    print(f"\nwall time {results['wall_seconds']:.0f} s; wrote kv_results.json, kv_table.md and "
          f"{os.path.basename(png)} under {args.output}")
    return 0


__all__ = ["KVEvalConfig", "build_cache", "check_ratios", "contexts", "expand", "format_table", "plot",
           "run_kv_eval", "score"]
