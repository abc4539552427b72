"""blockattn.kv's cache through hf.patch(kv=...): positions, logits against a float64 masked oracle, real
bytes, and the error messages."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import hf, kv  # noqa: E402
from tests.kv.common import VOCAB, Oracle, decode, rel, tiny_llama  # noqa: E402


@pytest.mark.parametrize("spec", ["knorm", "streaming", "tova:ratio=0.0"])
def test_keep_everything_generates_the_same_tokens(spec):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 90))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        with hf.patch(model, kv=spec):
            out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert isinstance(out.past_key_values, kv.KVCache)
    assert out.past_key_values.get_seq_length() == 90 + 11


@pytest.mark.parametrize("spec", ["streaming:ratio=0.6,sink=3", "knorm:ratio=0.5", "snapkv:ratio=0.5,window_size=8",
                                  "tova:ratio=0.7"])
def test_compressed_decode_equals_masked_float64_oracle(spec):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 120))
    positions = []
    hook = model.model.rotary_emb.register_forward_hook(
        lambda m, args, kwargs, out: positions.append(kwargs["position_ids"].flatten()), with_kwargs=True)
    logits, fed, attended, cache = decode(model, ids, 6, spec)
    hook.remove()
    # new tokens continue from the true position (120), not from the shrunken cache length
    assert [p.tolist() for p in positions[1:]] == [[120 + t] for t in range(6)]
    assert cache.get_seq_length() == 126 and max(max(cache.lengths())) < 126
    for layer in cache.layers:
        for p in layer.positions:
            assert p[0, -1] == 125 and bool((p[0, 1:] > p[0, :-1]).all())
    expected = Oracle(model).logits(ids, fed, attended)
    assert rel(logits, expected) < 1e-5
    dense, *_ = decode(model, ids, 6, "knorm")
    assert rel(dense, expected) > 1e-4   # the compression really changed what decoding sees


def test_cache_bytes_drop_for_uniform_and_per_head_budgets():
    model = tiny_llama(layers=2, kv_heads=2)
    n = 400
    ids = torch.randint(0, VOCAB, (1, n))
    with torch.no_grad():
        dense = kv.cache_bytes(model(ids, use_cache=True).past_key_values)
    assert dense == 2 * 2 * 2 * n * 16 * 4   # layers, K and V, heads, tokens, head_dim, fp32
    # per head: 4 bytes of position per token kept; per compensated head: k̂, v̂ (fp32, D = 16) and N_d
    overhead = 4 * 2 * 2 * 16 * 4 + 2 * 2 * 4
    for spec, ratio in [("knorm:ratio=0.7", 0.7), ("streaming:ratio=0.5", 0.5),
                        (kv.get("razor", ratio=0.7, retrieval_heads=[(1, 0)]), 0.7)]:
        with torch.no_grad(), hf.patch(model, kv=spec):
            cache = model(ids, use_cache=True).past_key_values
        lengths = cache.lengths()
        held = kv.cache_bytes(cache)
        assert held <= (1 - ratio) * dense * 1.05 + overhead, (spec, held, dense)
        assert held >= (1 - ratio) * dense * 0.9
        if not isinstance(spec, str):
            assert lengths[1][0] == n and lengths[0][0] < n   # per-head budgets: a retrieval head keeps all


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="known policies: .*razor.*snapkv.*streaming"):
        kv.get("h2o")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio must be in \\[0, 1\\)"):
            kv.get("knorm", ratio=bad)
    with pytest.raises(TypeError, match="ratio"):
        kv.get("snapkv", ratio="0.5")
    with pytest.raises(TypeError, match="does not take"):
        kv.get("knorm", budget=3)
    with pytest.raises(ValueError, match="known policies"):
        hf.patch(tiny_llama(), kv="nope:ratio=0.5")
    assert set(kv.names()) >= {"razor", "tidaldecode", "streaming", "snapkv", "tova", "knorm"}

    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 100))
    with hf.patch(model, kv="streaming:ratio=0.9,window=50"), pytest.raises(ValueError, match="smaller than sink"):
        model(ids, use_cache=True)
    with hf.patch(model, kv="snapkv:ratio=0.9,window_size=32"), pytest.raises(ValueError, match="smaller than"):
        model(ids, use_cache=True)
    with hf.patch(model, kv=kv.get("razor", ratio=0.99, retrieval_heads=[(0, 0)])), \
            pytest.raises(ValueError, match="smaller than sink"):
        model(ids, use_cache=True)
    with pytest.raises(ValueError, match="decode= and kv="):
        hf.patch(model, kv="knorm", decode="dense")
    filled = model(ids, use_cache=True).past_key_values
    with hf.patch(model, kv="knorm"), pytest.raises(ValueError, match="needs its own cache"):
        model(ids[:, :1], past_key_values=filled, use_cache=True)

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="KV cache"):
        hf.patch(bert, kv="knorm")
    with pytest.raises(TypeError, match="cache must be a transformers Cache"):
        kv.cache_bytes([torch.zeros(3)])


def test_unpatch_restores_plain_caching():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 50))
    with hf.patch(model, kv="knorm:ratio=0.5"):
        pass
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert not isinstance(cache, kv.KVCache) and not model._forward_pre_hooks


def test_short_prompts_keep_everything_without_errors():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=3, do_sample=False)
        for spec in ("streaming", "snapkv", "tova:ratio=0.5"):
            with hf.patch(model, kv=spec):
                out = model.generate(ids, max_new_tokens=3, do_sample=False)
            assert out.shape == ref.shape
            if spec != "tova:ratio=0.5":
                assert torch.equal(out, ref)
