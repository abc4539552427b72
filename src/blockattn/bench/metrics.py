"""Per-method metrics on a real model: per-layer attention quality on captured q/k/v (output relative
error, attention-mass recall, density, selection overhead; see `blockattn.bench.quality`), prefill
time through the patched model, and decode tokens/s over the KV cache.
"""
from __future__ import annotations

import time

import torch

from blockattn.bench import quality


def layer_quality(method, captured: dict, *, backend: str = "auto") -> dict:
    """Mean over the captured layers `{layer: (q, k, v)}` of `quality.measure`, plus the per-layer errors."""
    per_layer = {layer: quality.measure(method, *qkv, backend=backend, repeats=1, layer=layer)
                 for layer, qkv in captured.items()}
    rows = list(per_layer.values())
    mean = lambda attr: sum(getattr(r, attr) for r in rows) / len(rows)  # noqa: E731
    return {"recall": mean("recall"), "output_error": mean("output_error"), "density": mean("density"),
            "token_density": mean("token_density"), "select_overhead": mean("overhead"),
            "attention_speedup": mean("speedup"),
            "per_layer_error": {int(layer): r.output_error for layer, r in per_layer.items()},
            "per_layer_recall": {int(layer): r.recall for layer, r in per_layer.items()}}


@torch.no_grad()
def decode_tokens_per_second(model, prompt: torch.Tensor, *, new_tokens: int = 8) -> float:
    """Greedy decoding speed after the prefill: (T(prefill + n tokens) - T(prefill + 1 token)) / (n - 1)."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an int >= 2, got {new_tokens!r}")

    def run(n):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=getattr(model.config, "eos_token_id", 0) or 0)
        return time.perf_counter() - start
    one, many = run(1), run(new_tokens)
    return (new_tokens - 1) / max(many - one, 1e-9)
