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


def test_method_spec_strings_equal_keyword_hyperparameters():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 97, (1, 160))
    with torch.no_grad():
        with hf.patch(model, "sliding_window", window=16, block_size=32) as handle:
            by_keywords = model(ids).logits
        assert handle.plans[1].method.window == 16
        with hf.patch(model, "sliding_window:window=16,block_size=32") as handle:
            by_spec = model(ids).logits
        assert handle.plans[1].method.window == 16
        with hf.patch(model, "sliding_window", layers={1: "sliding_window:window=16,block_size=32"}) as handle:
            assert handle.plans[1].method.window == 16
        with hf.patch(model, "sliding_window:window=8,block_size=32", window=16) as handle:  # keywords win
            assert handle.plans[1].method.window == 16
    assert torch.equal(by_keywords, by_spec)
    with pytest.raises(ValueError, match="must look like key=value"):
        hf.patch(model, "sliding_window:window")
    with pytest.raises(ValueError, match="unknown method"):
        hf.patch(model, "sliding_windw:window=16")


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


# ------------------------------------------------------------------------------- hybrid (Gemma 3) models
def tiny_gemma3(window=48, scalar=9, seed=0, types=("sliding_attention", "sliding_attention", "full_attention",
                                                    "sliding_attention")):
    """Gemma 3 structure at toy size; query_pre_attn_scalar != head_dim so a dropped `scaling` shows."""
    config = transformers.Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=len(types), num_attention_heads=4,
                                           num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=scalar,
                                           sliding_window=window, layer_types=list(types),
                                           max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.set_attn_implementation("eager")  # transformers' own masks and math: the reference
    return model


def test_hybrid_dense_patch_equals_unpatched_and_sliding_layers_run_their_band():
    model = tiny_gemma3()
    ids = torch.randint(1, 97, (1, 200))  # 4 windows long: the band really cuts
    with torch.no_grad():
        ref = model.double()(ids).logits
        model.float()
        with hf.patch(model, "dense", block_size=32) as handle:
            out = model(ids).logits
    assert [p.layer_type for p in handle.plans] == list(model.config.layer_types)
    assert all(p.method is None for p in handle.plans if p.layer_type == "sliding_attention")
    # 64-token tiles over 200 tokens: the 48-token band touches 7 of the 10 causal tiles
    assert handle.stats_of("sliding_attention").density == pytest.approx(0.7)
    assert handle.stats_of("full_attention").density == pytest.approx(1.0)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_hybrid_band_off_by_one_and_scaling_would_be_caught(monkeypatch):
    model = tiny_gemma3()
    ids = torch.randint(1, 97, (1, 200))
    with torch.no_grad():
        ref = model(ids).logits
    # one key too many per row (window instead of window - 1 before the query): visibly different
    from blockattn.integrations import hf as integration
    integration._band.cache_clear()
    monkeypatch.setattr(integration, "_band_rule", lambda w, causal: (w, 0))
    with torch.no_grad(), hf.patch(model, "dense"):
        wide = model(ids).logits
    integration._band.cache_clear()
    monkeypatch.undo()
    assert (wide - ref).norm() / ref.norm() > 1e-4
    # the module's own scaling: the engine's default D ** -0.5 would differ (scalar 9 vs head_dim 16)
    with torch.no_grad(), hf.patch(model, "dense"):
        model.model.layers[0].self_attn.scaling = 16 ** -0.5
        unscaled = model(ids).logits
    assert (unscaled - ref).norm() / ref.norm() > 1e-4


def test_hybrid_generation_past_the_window_is_token_identical():
    model = tiny_gemma3(window=32)
    ids = torch.randint(1, 97, (2, 90))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
        with hf.patch(model, "dense", block_size=16) as handle:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert handle.stats.decode_calls > 0


def test_hybrid_method_on_full_layers_by_default_and_per_layer_type():
    model = tiny_gemma3()
    ids = torch.randint(1, 97, (1, 192))
    sink, window = 4, 40
    i = torch.arange(192).view(-1, 1)
    j = torch.arange(192).view(1, -1)
    band = (j <= i) & (j > i - 48)
    stream = (j <= i) & ((j < sink) | (j > i - window))
    with torch.no_grad(), hf.patch(model, "streaming", sink=sink, window=window, block_size=32) as handle:
        out = model(ids).logits
    assert [p.method is not None for p in handle.plans] == [t == "full_attention" for t in model.config.layer_types]

    def oracle(keeps):  # float64 eager clone, each layer given its rule as an explicit additive mask
        clone = tiny_gemma3().double()
        clone.load_state_dict(model.state_dict())
        for layer, keep in zip(clone.model.layers, keeps):
            bias = torch.zeros(192, 192, dtype=torch.float64).masked_fill(~keep, float("-inf"))[None, None]

            def forward(*args, _orig=layer.self_attn.forward, _bias=bias, **kwargs):
                kwargs["attention_mask"] = _bias
                return _orig(*args, **kwargs)
            layer.self_attn.forward = forward
        with torch.no_grad():
            return clone(ids).logits

    expected = oracle([band if kind == "sliding_attention" else stream for kind in model.config.layer_types])
    assert (out.double() - expected).norm() / expected.norm() < 1e-5
    # per layer type: the method on the sliding layers too (cut to their band); layers= still wins
    with torch.no_grad(), hf.patch(model, "streaming", sink=sink, window=window, block_size=32,
                                   layer_types={"sliding_attention": {}}, layers={0: None}) as handle:
        both = model(ids).logits
    assert [p.method is not None for p in handle.plans] == [False, True, True, True]
    expected = oracle([band, band & stream, stream, band & stream])
    assert (both.double() - expected).norm() / expected.norm() < 1e-5
    with pytest.raises(ValueError, match="full_attention"):
        hf.patch(model, "dense", layer_types={"global": None})


def test_bf16_patched_model_is_as_close_to_fp32_as_unpatched_bf16():
    model = tiny_gemma3()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(1, 97, (1, 256))
    with torch.no_grad():
        ref = model(ids).logits.double()
        model.bfloat16()
        plain = model(ids).logits.double()
        with hf.patch(model, "dense"):
            patched = model(ids).logits.double()
    err_plain = (plain - ref).norm() / ref.norm()
    err_patched = (patched - ref).norm() / ref.norm()
    assert err_patched <= 1.5 * err_plain, (float(err_patched), float(err_plain))


def test_soft_capped_attention_is_refused():
    config = transformers.Gemma2Config(vocab_size=11, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="soft-cap"):
        hf.patch(transformers.Gemma2ForCausalLM(config))


@pytest.fixture(scope="module")
def gemma3():
    pytest.importorskip("gguf")
    from blockattn import models
    try:
        return models.load("gemma3-270m")
    except ImportError as error:
        pytest.skip(str(error))


@pytest.mark.slow
def test_gemma3_structure_logits_greedy_generation_and_bf16_error(gemma3):
    """Gemma 3 270M (15 sliding layers, window 512, 3 full layers) at 1,024 tokens: two windows, so the
    sliding layers' band really cuts. Logits of the last 128 positions (the 262k-entry LM head)."""
    from blockattn.bench.tasks import document_ids
    model, tokenizer = gemma3
    ids = document_ids(tokenizer, 1024, seed=1)
    with torch.no_grad():
        ref = model(ids, use_cache=False, logits_to_keep=128).logits
        with hf.patch(model, "dense") as handle:
            out = model(ids, use_cache=False, logits_to_keep=128).logits
        assert handle.stats_of("sliding_attention").density < 0.8 and handle.stats_of("full_attention").density == 1
        assert (out - ref).norm() / ref.norm() < 1e-5
        prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
        plain = model.generate(prompt, max_new_tokens=16, do_sample=False)
        with hf.patch(model, "dense"):
            patched = model.generate(prompt, max_new_tokens=16, do_sample=False)
        assert torch.equal(plain, patched)
        saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        model.bfloat16()
        try:
            plain_bf16 = model(ids, use_cache=False, logits_to_keep=128).logits.float()
            with hf.patch(model, "dense"):
                patched_bf16 = model(ids, use_cache=False, logits_to_keep=128).logits.float()
        finally:  # the fixture's model goes back to its exact float32 weights
            model.float().load_state_dict(saved)
    err_plain = (plain_bf16 - ref).norm() / ref.norm()
    err_patched = (patched_bf16 - ref).norm() / ref.norm()
    assert err_patched <= 1.5 * err_plain, (float(err_patched), float(err_plain))
