"""Offline per-head calibration of MInference's head patterns and of XAttention's thresholds, on q/k
captured from a model, written as JSON that `methods.get("vertical_slash", config=PATH)` and
`methods.get("xattention", thresholds=PATH)` (so `hf.patch(model, name, config=/thresholds=PATH)`) load.

    blockattn calibrate vertical_slash --model smollm2-135m --tokens 4096 --out vs.json
    blockattn calibrate xattention --model smollm2-135m --tokens 4096 --out xattn.json

MInference (Jiang et al., 2024), "kernel-aware sparse pattern search" as its `search_pattern`
(minference/modules/minference_forward.py, run with `is_search` on one 30k-token KV-retrieval prompt):
for each head, every candidate of a fixed grid is scored by its recall, the dense causal softmax mass it
keeps averaged over the query rows from 2500 on, and the head takes the first candidate with the
highest recall. The grid (`OFFICIAL_CANDIDATES`) is the official one: A-shape ("stream_llm") 100 sink
+ 800 local, vertical-slash (30, 800), (100, 750), (500, 700), (3500, 100), and block-sparse keeping
1/8 of the key blocks per query block. Deliberate differences, each said where it is done:
- a candidate is scored on the layout `VerticalSlash` really runs for it (the kernel's 64-key slash
  ranges, 100 forced diagonals, 64-token pooled blocks); the official search scores exact diagonals
  with 30 forced and 32-token blocks, which its kernels do not run;
- the winning pattern is kept; the official script then rewrites A-shape winners as vertical-slash of
  the same sizes and block-sparse winners as the (1000, 6096) fallback (`official_remap=True` does too);
- rows from `min(score_from, L // 2)` are scored, so prompts shorter than 2500 tokens can be used;
- `scale` multiplies the grid's token sizes (block-sparse is a ratio already): the grid was chosen for a
  30k-token search, `scale = tokens / 30000` keeps its densities at a shorter calibration length.

XAttention (Xu et al., 2025) per-head thresholds, as its profiler
(xattn/threshold/profile_threshold/profile_threshold.py): per query block, the fewest key blocks that
cover `coverage` (0.9) of the exact block attention; the smallest antidiagonal score among them; the
head's threshold is the share of its antidiagonal mass at or above those per-row scores; the maximum
over the calibration texts. `mode="recall"` instead runs `XAttention.calibrate` (the smallest grid
threshold whose layout keeps `target_recall` of the dense mass) per layer.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import Tensor

from blockattn import _checks

#: (pattern, first, second): vertical-slash (vertical_size, slash_size), stream_llm (n_init, n_local),
#: block_sparse (ratio, 0): keep n_blocks // ratio key blocks; `search_pattern`'s grid, in its order
OFFICIAL_CANDIDATES = (("stream_llm", 100, 800), ("vertical_and_slash", 30, 800), ("vertical_and_slash", 100, 750),
                       ("vertical_and_slash", 500, 700), ("vertical_and_slash", 3500, 100), ("block_sparse", 8, 0))
SCORE_FROM = 2500  # the official search scores the query rows from 2500 on
_ROWS = 256        # query rows of dense attention held at once (O(L) memory)
_FALLBACK = ("vertical_and_slash", 1000, 6096)  # the official pattern for a head with no config entry


# ---------------------------------------------------------------------------------------- config files
def _read_json(path, what: str):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str), got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"{what}={str(path)!r}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}={str(path)!r} is not JSON: {error}") from None


def _pattern_entry(entry, where: str) -> tuple:
    """One head's `(pattern, first, second)` from our dict form or the official `[ty, v, s, score]` list."""
    from blockattn.methods.vertical_slash import PATTERNS
    if isinstance(entry, dict):
        kind = entry.get("pattern")
        keys = {"vertical_and_slash": ("vertical_size", "slash_size"), "stream_llm": ("n_init", "n_local"),
                "block_sparse": ("top_k", None)}.get(kind)
        if keys is None:
            raise ValueError(f"config {where}: pattern must be one of {list(PATTERNS)}, got {kind!r}")
        values = [entry.get(keys[0]), entry.get(keys[1], 0) if keys[1] else 0]
    elif isinstance(entry, (list, tuple)) and len(entry) >= 3:
        kind, values = entry[0], list(entry[1:3])
        if kind == "block_sparse":
            values = [100, 0]  # the official dispatch runs block-sparse heads with top_k = 100
    else:
        raise ValueError(f"config {where}: expected a pattern dict or [pattern, size, size, score], got {entry!r}")
    if kind not in PATTERNS:
        raise ValueError(f"config {where}: pattern must be one of {list(PATTERNS)}, got {kind!r}")
    lowest = {"vertical_and_slash": (1, 1), "stream_llm": (0, 1), "block_sparse": (1, 0)}[kind]
    for value, low in zip(values, lowest):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"config {where}: {kind} sizes must be ints >= {low}, got {values}")
    return (kind, values[0], values[1])


def load_patterns(path) -> list[list[tuple]]:
    """Per layer, per query head `(pattern, first, second)` from a `calibrate vertical_slash` JSON
    (`{"patterns": [[{...}, ...], ...]}`) or an official MInference config (a list of layers, each
    `{"head": [pattern, vertical_size, slash_size, score]}`; heads it omits get the official fallback)."""
    data = _read_json(path, "config")
    if isinstance(data, dict):
        layers = data.get("patterns")
        if not isinstance(layers, list) or not all(isinstance(layer, list) for layer in layers):
            raise ValueError(f"config={str(path)!r}: 'patterns' must be a list (layers) of lists (heads)")
        return [[_pattern_entry(e, f"layer {i} head {h}") for h, e in enumerate(layer)] for i, layer in enumerate(layers)]
    if isinstance(data, list) and all(isinstance(layer, dict) for layer in data):
        patterns = []
        for i, layer in enumerate(data):
            heads = 1 + max((int(h) for h in layer), default=-1)
            patterns.append([_pattern_entry(layer[str(h)], f"layer {i} head {h}") if str(h) in layer else _FALLBACK
                             for h in range(heads)])
        return patterns
    raise ValueError(f"config={str(path)!r}: expected a calibrate vertical_slash JSON or an official MInference "
                     "per-layer list of per-head patterns")


def load_thresholds(path) -> tuple[list[tuple[float, ...]], dict]:
    """Per layer, per query head thresholds from a `calibrate xattention` JSON, and the file's header."""
    data = _read_json(path, "thresholds")
    table = data.get("thresholds") if isinstance(data, dict) else None
    if not isinstance(table, list) or not table or not all(isinstance(row, list) and row for row in table):
        raise ValueError(f"thresholds={str(path)!r}: expected {{'thresholds': [[one per head] per layer]}}")
    layers = [tuple(_checks.fraction_arg(f"thresholds[{i}][{h}]", t) for h, t in enumerate(row))
              for i, row in enumerate(table)]
    return layers, {key: value for key, value in data.items() if key != "thresholds"}


def _pattern_dict(pattern: tuple, recall: float) -> dict:
    kind, first, second = pattern
    names = {"vertical_and_slash": ("vertical_size", "slash_size"), "stream_llm": ("n_init", "n_local"),
             "block_sparse": ("top_k", None)}[kind]
    entry = {"pattern": kind, names[0]: int(first)}
    if names[1]:
        entry[names[1]] = int(second)
    entry["recall"] = round(float(recall), 6)
    return entry


# ---------------------------------------------------------------------------------------- MInference search
def candidate_patterns(candidates, length: int, *, block: int = 64, scale: float = 1.0) -> list[tuple]:
    """The grid made concrete for a prompt of `length` tokens: token sizes times `scale` (at least 1),
    block-sparse's ratio as `top_k = max(1, n_blocks // ratio)` key blocks."""
    n_blocks = -(-length // block)
    concrete = []
    for kind, first, second in candidates:
        if kind == "block_sparse":
            concrete.append((kind, max(1, n_blocks // int(first)), 0))
        else:
            concrete.append((kind, max(int(kind == "vertical_and_slash"), round(first * scale)),
                             max(1, round(second * scale))))
    return concrete


def kept_mass(q: Tensor, k: Tensor, layouts, *, score_from: int = 0) -> Tensor:
    """float64 `[len(layouts), B, Hq]`: per head, the dense causal softmax mass (scale 1/sqrt(D)) each
    layout's token mask keeps, averaged over the query rows from `score_from` on."""
    batch, heads, length, dim = q.shape
    heads_kv = k.shape[1]
    group = heads // heads_kv
    block = layouts[0].block_q
    keys = k.float().transpose(-1, -2) * dim ** -0.5
    total = torch.zeros(len(layouts), batch, heads, dtype=torch.float64, device=q.device)
    first_block = score_from // block
    per = max(1, _ROWS // block)
    columns = torch.arange(length, device=q.device)
    for start_block in range(first_block, -(-length // block), per):
        stop_block = min(-(-length // block), start_block + per)
        rows = torch.arange(start_block * block, min(length, stop_block * block), device=q.device)
        logits = (q[:, :, rows].float().reshape(batch, heads_kv, group * len(rows), dim) @ keys)
        logits = logits.view(batch, heads, len(rows), length).masked_fill(columns > rows.view(-1, 1), float("-inf"))
        probs = torch.softmax(logits, dim=-1) * (rows >= score_from).view(-1, 1)
        for c, layout in enumerate(layouts):
            mask = layout.token_mask_rows(start_block, stop_block)[..., :len(rows), :length]
            total[c] += (probs * mask).sum((-1, -2)).double()
    return total / (length - score_from)


def search_patterns(q: Tensor, k: Tensor, *, candidates=OFFICIAL_CANDIDATES, score_from: int = SCORE_FROM,
                    scale: float = 1.0, method=None) -> tuple[list[tuple], Tensor, list[tuple]]:
    """One layer's search: `(chosen pattern per query head, recall [C, Hq] of every candidate, the
    concrete candidates)`. Recall is averaged over the batch; ties go to the earlier candidate."""
    from blockattn.methods.vertical_slash import VerticalSlash
    _checks.check_qk(q, k)
    method = method or VerticalSlash()
    length, heads = q.shape[2], q.shape[1]
    concrete = candidate_patterns(candidates, length, block=method.block_size, scale=scale)
    layouts = [method.pattern_layout(q, k, [pattern] * heads) for pattern in concrete]
    start = score_from if length > score_from else length // 2
    recall = kept_mass(q, k, layouts, score_from=start).mean(1)                      # [C, H]
    best = recall.argmax(0)  # first maximum, as the official strict '>' over the grid in order
    return [concrete[int(c)] for c in best], recall, concrete


def _remap(pattern: tuple) -> tuple:
    """The official search script's rewrite: A-shape -> vertical-slash of the same sizes, block -> fallback."""
    if pattern[0] == "stream_llm":
        return ("vertical_and_slash", pattern[1], pattern[2])
    return _FALLBACK if pattern[0] == "block_sparse" else pattern


def calibrate_vertical_slash(model, input_ids: Tensor, *, candidates=OFFICIAL_CANDIDATES, score_from: int = SCORE_FROM,
                             scale: float = 1.0, official_remap: bool = False, layers=None, method=None) -> dict:
    """The per-layer/per-head pattern config (a JSON-able dict) of `model` on one prompt `input_ids [1, L]`."""
    from blockattn.bench.capture import capture_qkv
    captured = capture_qkv(model, input_ids, layers=layers)
    patterns, grid = [], None
    for layer in sorted(captured):
        q, k, _ = captured.pop(layer)
        chosen, recall, grid = search_patterns(q, k, candidates=candidates, score_from=score_from, scale=scale,
                                               method=method)
        head_recall = recall.max(0).values
        if official_remap:
            chosen = [_remap(p) for p in chosen]
        patterns.append([_pattern_dict(p, r) for p, r in zip(chosen, head_recall.tolist())])
    counts = {}
    for layer in patterns:
        for entry in layer:
            key = json.dumps({k: v for k, v in entry.items() if k != "recall"})
            counts[key] = counts.get(key, 0) + 1
    return {"method": "vertical_slash", "tokens": int(input_ids.shape[1]), "score_from": score_from, "scale": scale,
            "official_remap": official_remap, "candidates": [list(c) for c in grid],
            "layers": len(patterns), "heads": len(patterns[0]) if patterns else 0,
            "counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "patterns": patterns}


# ---------------------------------------------------------------------------------------- XAttention
def exact_block_mass(q: Tensor, k: Tensor, block: int) -> Tensor:
    """`[B, Hq, nQ, nK]`: the dense causal softmax mass (scale 1/sqrt(D)) of each block pair, summed
    over the block's queries and keys (prefill, q_len == k_len), computed `_ROWS` query rows at a time."""
    batch, heads, length, dim = q.shape
    heads_kv = k.shape[1]
    group = heads // heads_kv
    n = -(-length // block)
    keys = torch.nn.functional.pad(k.float(), (0, 0, 0, n * block - length)).transpose(-1, -2) * dim ** -0.5
    columns = torch.arange(n * block, device=q.device)
    out = torch.zeros(batch, heads, n, n, device=q.device)
    per = max(1, _ROWS // block)
    for first in range(0, n, per):
        stop = min(n, first + per)
        rows = torch.arange(first * block, min(length, stop * block), device=q.device)
        logits = (q[:, :, rows].float().reshape(batch, heads_kv, group * len(rows), dim) @ keys)
        logits = logits.view(batch, heads, len(rows), n * block)
        probs = torch.softmax(logits.masked_fill((columns > rows.view(-1, 1)) | (columns >= length), float("-inf")), -1)
        probs = torch.nn.functional.pad(probs, (0, 0, 0, (stop - first) * block - len(rows)))
        out[:, :, first:stop] = probs.view(batch, heads, stop - first, block, n, block).sum((3, 5))
    return out


def profile_thresholds(method, q: Tensor, k: Tensor, *, coverage: float = 0.9) -> Tensor:
    """float `[B, Hq]`: XAttention's profiled per-head threshold on one prompt (official profiler rule)."""
    _checks.check_qk(q, k)
    exact = exact_block_mass(q, k, method.block_size)
    estimate = method.block_scores(q, k)[..., :exact.shape[-2], :exact.shape[-1]]
    values, order = exact.sort(-1, descending=True)
    cumulative = values.cumsum(-1)
    need = (cumulative < coverage * cumulative[..., -1:]).sum(-1, keepdim=True) + 1     # fewest blocks per row
    selected = torch.arange(values.shape[-1], device=q.device) < need
    smallest = estimate.gather(-1, order).masked_fill(~selected, float("inf")).min(-1, keepdim=True).values
    kept = (estimate * (estimate >= smallest)).sum((-1, -2))
    return kept / (estimate.sum((-1, -2)) + 1e-8)


def calibrate_xattention(model, prompts: list[Tensor], *, mode: str = "profile", coverage: float = 0.9,
                         target_recall: float = 0.95, layers=None, method=None) -> dict:
    """Per-layer/per-head thresholds (a JSON-able dict) of `model` on `prompts` (`[1, L]` ids each):
    `mode="profile"` the official profiler's rule, maximum over prompts; `"recall"` `XAttention.calibrate`
    per layer (on the first prompt)."""
    from blockattn.bench.capture import capture_qkv
    from blockattn.methods.xattention import XAttention
    if mode not in ("profile", "recall"):
        raise ValueError(f"mode must be 'profile' or 'recall', got {mode!r}")
    _checks.fraction_arg("coverage", coverage)
    method = method or XAttention()
    table = {}
    for prompt in (prompts if mode == "profile" else prompts[:1]):
        captured = capture_qkv(model, prompt, layers=layers)
        for layer in sorted(captured):
            q, k, _ = captured.pop(layer)
            if mode == "profile":
                found = profile_thresholds(method, q, k, coverage=coverage).amax(0).clamp(1e-6, 1.0)
                table[layer] = found if layer not in table else torch.maximum(table[layer], found)
            else:
                table[layer] = torch.tensor(method.calibrate(q, k, target_recall=target_recall).threshold)
    rows = [[round(float(t), 6) for t in table[layer]] for layer in sorted(table)]
    return {"method": "xattention", "tokens": int(prompts[0].shape[1]), "samples": len(prompts), "mode": mode,
            "coverage": coverage, "target_recall": target_recall, "stride": method.stride,
            "block_size": method.block_size, "layers": len(rows), "heads": len(rows[0]) if rows else 0,
            "thresholds": rows}


# ---------------------------------------------------------------------------------------- CLI
def _prompts(tokenizer, tokens: int, samples: int) -> list[Tensor]:
    from blockattn.bench.capture import real_text_ids
    from blockattn.bench.tasks import document_text
    prompts = [real_text_ids(tokenizer, tokens)]
    for s in range(1, samples):
        ids = tokenizer(document_text(tokens * 8, seed=s), return_tensors="pt").input_ids[:, :tokens]
        prompts.append(ids)
    return prompts


def _common(parser, out: str):
    parser.add_argument("--model", default="smollm2-135m", help="model name (blockattn.models) or HF folder")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration prompt length (Python docs text)")
    parser.add_argument("--out", default=out, help="JSON file to write")
    parser.add_argument("--layers", type=int, default=None, help="calibrate only the first N layers")


def _write(config: dict, args, start: float):
    config["model"] = args.model
    with open(args.out, "w") as f:
        json.dump(config, f, indent=1)
    print(f"wrote {args.out}: {config['layers']} layers x {config['heads']} heads in "
          f"{time.perf_counter() - start:.0f} s")


def vertical_slash_main(argv=None):
    parser = argparse.ArgumentParser(prog="blockattn calibrate vertical_slash", description=(
        "MInference's offline per-head pattern search: writes a per-layer/per-head config for "
        "methods.get('vertical_slash', config=PATH) / hf.patch(model, 'vertical_slash', config=PATH)"))
    _common(parser, "vertical_slash_config.json")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the official grid's token sizes (chosen for a 30k-token search)")
    parser.add_argument("--score-from", type=int, default=SCORE_FROM, help="first query row scored (official 2500)")
    parser.add_argument("--official-remap", action="store_true",
                        help="rewrite A-shape/block-sparse winners as the official search script does")
    args = parser.parse_args(argv)
    import blockattn.models
    start = time.perf_counter()
    model, tokenizer = blockattn.models.load(args.model)
    layers = list(range(args.layers)) if args.layers else None
    config = calibrate_vertical_slash(model, _prompts(tokenizer, args.tokens, 1)[0], scale=args.scale,
                                      score_from=args.score_from, official_remap=args.official_remap, layers=layers)
    _write(config, args, start)
    print("patterns:", ", ".join(f"{n} x {key}" for key, n in config["counts"].items()))


def xattention_main(argv=None):
    parser = argparse.ArgumentParser(prog="blockattn calibrate xattention", description=(
        "XAttention per-head threshold calibration: writes per-layer/per-head thresholds for "
        "methods.get('xattention', thresholds=PATH) / hf.patch(model, 'xattention', thresholds=PATH)"))
    _common(parser, "xattention_thresholds.json")
    parser.add_argument("--samples", type=int, default=1, help="calibration texts (profile mode keeps the maximum)")
    parser.add_argument("--mode", choices=("profile", "recall"), default="profile",
                        help="profile: the official profiler's rule; recall: smallest grid threshold reaching "
                             "--target-recall")
    parser.add_argument("--coverage", type=float, default=0.9, help="profile: exact-attention coverage per row")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args(argv)
    import blockattn.models
    from blockattn.methods.xattention import XAttention
    start = time.perf_counter()
    model, tokenizer = blockattn.models.load(args.model)
    layers = list(range(args.layers)) if args.layers else None
    config = calibrate_xattention(model, _prompts(tokenizer, args.tokens, args.samples), mode=args.mode,
                                  coverage=args.coverage, target_recall=args.target_recall, layers=layers,
                                  method=XAttention(stride=args.stride, block_size=args.block_size))
    _write(config, args, start)
