"""blockattn.hf on a tiny random Llama (fast) and on the real SmolLM2 / MiniLM shipped in the venv."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import blockattn  # noqa: E402
from blockattn import hf  # noqa: E402


def tiny_llama(layers=2, heads=4, kv_heads=2, max_pos=512, seed=0):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=max_pos)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def eager_masked_logits(model, ids, keep):
    """float64 eager model with an explicit 4-D additive mask built from a [L, L] keep rule (the oracle)."""
    ref = tiny_llama_like(model).double()
    bias = torch.zeros(ids.shape[1], ids.shape[1], dtype=torch.float64)
    bias[~keep] = float("-inf")
    with torch.no_grad():
        return ref(ids, attention_mask=bias[None, None]).logits


def tiny_llama_like(model):
    clone = transformers.LlamaForCausalLM(model.config).eval()
    clone.load_state_dict(model.state_dict())
    clone.set_attn_implementation("eager")
    return clone


def test_dense_patch_matches_sdpa_and_unpatch_restores():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 150))
    with torch.no_grad():
        ref = model(ids).logits
        with hf.patch(model, "dense", block_size=32) as handle:
            assert model.config._attn_implementation == "blockattn"
            out = model(ids).logits
        assert handle.stats.prefill_calls == 2 and handle.stats.density == pytest.approx(1.0)
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(ids).logits, ref)
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_streaming_patch_equals_float64_masked_model():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 200))
    sink, window = 5, 40
    i = torch.arange(200).view(-1, 1)
    j = torch.arange(200).view(1, -1)
    keep = (j <= i) & ((j < sink) | (j > i - window))
    expected = eager_masked_logits(model, ids, keep)
    with torch.no_grad(), hf.patch(model, "streaming", sink=sink, window=window, block_size=32):
        out = model(ids).logits
    assert ((out.double() - expected).norm() / expected.norm()) < 1e-5
    with torch.no_grad():
        dense = model(ids).logits
    assert ((dense.double() - expected).norm() / expected.norm()) > 1e-3  # the window really cut something


def test_per_layer_and_per_head_specs():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 97, (1, 160))
    i = torch.arange(160).view(-1, 1)
    j = torch.arange(160).view(1, -1)
    with torch.no_grad():
        ref = model(ids).logits
        # layer 0 dense, layer 1 sliding window: differs from dense, equals the per-layer oracle below
        with hf.patch(model, "sliding_window", window=16, block_size=32, layers={0: None}) as handle:
            mixed = model(ids).logits
        assert handle.plans[0].method is None and handle.plans[1].method.window == 16
        # per head: every head dense except through the params dict -> same as dense when window covers all
        with hf.patch(model, "sliding_window", window=16, block_size=32,
                      heads=lambda layer, h: {"window": 1000}):
            wide = model(ids).logits
    assert (wide - ref).norm() / ref.norm() < 1e-5
    assert (mixed - ref).norm() / ref.norm() > 1e-4
    # oracle for the mixed model: run layer 1 alone windowed through an eager float64 clone
    clone = tiny_llama_like(model).double()
    keep = (j <= i) & (j > i - 16)
    full = torch.zeros(160, 160, dtype=torch.float64).masked_fill(~(j <= i), float("-inf"))
    band = torch.zeros(160, 160, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    masks = [full[None, None], band[None, None]]
    for layer, attn in enumerate(clone.model.layers):
        original = attn.self_attn.forward

        def forward(*args, _orig=original, _mask=masks[layer], **kwargs):
            kwargs["attention_mask"] = _mask
            return _orig(*args, **kwargs)
        attn.self_attn.forward = forward
    with torch.no_grad():
        expected = clone(ids).logits
    assert (mixed.double() - expected).norm() / expected.norm() < 1e-5


def test_generate_with_cache_and_left_padding_matches_unpatched():
    model = tiny_llama()
    ids = torch.randint(1, 97, (2, 70))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding on the second row
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        with hf.patch(model, "dense", block_size=32) as handle:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert handle.stats.decode_calls > 0


def test_attn_implementation_string_works():
    model = tiny_llama()
    hf.register()
    ids = torch.randint(0, 97, (1, 64))
    with torch.no_grad():
        ref = model(ids).logits
        model.set_attn_implementation("blockattn")
        out = model(ids).logits
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_bad_input_errors():
    model = tiny_llama(max_pos=128)
    with pytest.raises(ValueError, match="known|registered|available"):
        hf.patch(model, "no_such_method")
    with pytest.raises((TypeError, ValueError), match="bogus"):
        hf.patch(model, "streaming", bogus=3)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="layers"):
        hf.patch(model, "dense", layers=3)
    with pytest.raises(ValueError, match="backend"):
        hf.patch(model, "dense", backend="nope")
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(model)
    with hf.patch(model, "dense"), pytest.raises(ValueError, match="context of 128"), torch.no_grad():
        model(torch.randint(0, 97, (1, 130)))


def test_unpatchable_model_is_refused():
    class Old(transformers.LlamaForCausalLM):
        _supports_attention_backend = False
    config = transformers.LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(TypeError, match="cannot patch"):
        hf.patch(Old(config))


# ------------------------------------------------------------------------------------------ real models
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from blockattn import models
    try:
        return models.load("smollm2-135m")
    except ImportError as error:
        pytest.skip(str(error))


def test_smollm2_full_layout_logits_and_greedy_generation(smollm2):
    from blockattn.bench.tasks import document_text
    model, tokenizer = smollm2
    ids = tokenizer(document_text(20000, seed=1), return_tensors="pt").input_ids[:, :2048]
    assert ids.shape[1] == 2048  # the bar: a 2k-token prompt
    with torch.no_grad():
        ref = model(ids).logits
        with hf.patch(model, "dense"):
            out = model(ids).logits
    assert (out - ref).norm() / ref.norm() < 1e-4
    prompts = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process"]
    for prompt in prompts:
        p = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            g0 = model.generate(p, max_new_tokens=64, do_sample=False)
            with hf.patch(model, "dense"):
                g1 = model.generate(p, max_new_tokens=64, do_sample=False)
        assert torch.equal(g0, g1), prompt


def test_minilm_full_layout_embeddings_identical():
    from blockattn import models
    from blockattn.bench.tasks import encoder_fidelity
    try:
        model, tokenizer = models.load("minilm-l6")
    except ImportError as error:
        pytest.skip(str(error))
    result = encoder_fidelity(model, tokenizer, "dense", n_sentences=16)
    assert result["min_cosine"] >= 0.99999
    with pytest.raises(ValueError, match="bidirectional"):
        encoder_fidelity(model, tokenizer, "streaming", n_sentences=4)
