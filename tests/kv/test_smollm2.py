"""One short check on the real SmolLM2-135M (GQA 9/3, 30 layers): keep-everything decoding is unchanged,
and RazorAttention at ratio 0.7 really holds ~30% of the dense cache bytes."""
import pytest
import torch

pytest.importorskip("transformers")

import blockattn  # noqa: E402
from blockattn import hf, kv  # noqa: E402


def test_smollm2_keep_everything_and_razor_bytes():
    model, tokenizer = blockattn.models.load("smollm2-135m")
    ids = tokenizer("A fox jumps over the dog. The dog sleeps in the sun. " * 12, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
        dense = kv.cache_bytes(model(ids, use_cache=True).past_key_values)
        with hf.patch(model, kv="streaming"):
            assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), ref)
        with hf.patch(model, kv=kv.get("razor", ratio=0.7, probe_period=48)):
            cache = model(ids, use_cache=True).past_key_values
    lengths = cache.lengths()
    assert len({n for layer in lengths for n in layer}) > 1   # per-head budgets differ
    overhead = 30 * 3 * (2 * 64 * 4 + 4)                     # one compensation slot per head at most
    assert kv.cache_bytes(cache) <= 0.3 * dense * 1.05 + overhead
