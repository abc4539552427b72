"""capture_qkv on a tiny randomly initialised Llama (no hub): shapes, untouched outputs, restored state."""
import pytest
import torch

transformers = pytest.importorskip("transformers")


def test_capture_records_post_rope_qkv_without_changing_outputs():
    from blockattn.bench.capture import capture_qkv
    from blockattn.ops.reference import reference_attention
    from blockattn import patterns

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        before = model(ids).logits
    captured = capture_qkv(model, ids)
    assert sorted(captured) == [0, 1]
    q, k, v = captured[1]
    assert q.shape == (1, 4, 40, 8) and k.shape == v.shape == (1, 2, 40, 8)
    assert model.config._attn_implementation != "blockattn_capture"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # the captured tensors are what attention consumed: causal attention over them feeds o_proj
    seen = {}
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        model(ids)
    expected = reference_attention(q.double(), k.double(), v.double(), patterns.causal(40, block_q=16, block_k=16))
    assert torch.allclose(expected.transpose(1, 2).reshape(1, 40, 32).float(), seen["x"], atol=1e-5)


def test_real_text_ids_length_and_too_short():
    from blockattn.bench.capture import real_text_ids

    class Chars:  # a stand-in tokenizer: one token per character
        def __call__(self, text, return_tensors):
            import types
            return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) % 1000 for c in text]]))

    ids = real_text_ids(Chars(), 5000)
    import pydoc_data.topics as topics
    assert ids.shape == (1, 5000)
    assert ids[0, :10].tolist() == [ord(c) % 1000 for c in "\n\n".join(topics.topics.values())[:10]]

    class Short(Chars):
        def __call__(self, text, return_tensors):
            return super().__call__(text[:10], return_tensors)

    with pytest.raises(ValueError, match="not enough text"):
        real_text_ids(Short(), 100)
