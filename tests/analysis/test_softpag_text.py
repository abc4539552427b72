"""SoftPAG-guided decoding on a tiny random Llama: the guidance formula, its identities, greedy decoding."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import analysis, hf  # noqa: E402
from blockattn.analysis.softpag_text import guided_generate, guided_logits  # noqa: E402

HEADS, KV_HEADS, DIM, VOCAB = 4, 2, 8, 97


def tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * DIM, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def eager_next_logits(model, ids, perturb=None):
    """Eager twin; `perturb` {(layer, head): u} rewrites that head's o_proj input to (1 - u) out + u v_self, v
    taken from the layer's v_proj (what identity attention outputs), written out plainly."""
    twin = transformers.LlamaForCausalLM(model.config).eval()
    twin.load_state_dict(model.state_dict())
    twin.set_attn_implementation("eager")
    values, handles = {}, []
    for i, block in enumerate(twin.model.layers):
        def keep_v(m, args, out, i=i):
            values[i] = out.view(out.shape[0], out.shape[1], KV_HEADS, DIM)

        def edit(m, args, i=i):
            x = args[0].view(args[0].shape[0], args[0].shape[1], HEADS, DIM).clone()
            for (layer, head), u in (perturb or {}).items():
                if layer == i:
                    v_self = values[i][:, :, head // (HEADS // KV_HEADS)]
                    x[:, :, head] = (1 - u) * x[:, :, head] + u * v_self
            return (x.reshape(args[0].shape),)
        handles += [block.self_attn.v_proj.register_forward_hook(keep_v),
                    block.self_attn.o_proj.register_forward_pre_hook(edit)]
    try:
        with torch.no_grad():
            return twin(ids).logits[:, -1].double()
    finally:
        for h in handles:
            h.remove()


def test_zero_guidance_and_zero_strength_return_plain_logits():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad(), hf.patch(model, "dense"):
        plain = model(ids, logits_to_keep=1).logits[:, -1].float()
        torch.testing.assert_close(model(ids).logits[:, -1], plain, rtol=1e-6, atol=1e-6)
    heads = [(0, 1), (1, 3)]
    assert torch.equal(guided_logits(model, ids, heads, strength=1.0, guidance=0.0), plain)
    assert torch.equal(guided_logits(model, ids, heads, strength=0.0, guidance=3.0), plain)
    assert torch.equal(guided_logits(model, ids, [], strength=1.0, guidance=3.0), plain)
    # u = 0 through the hook itself (the weak branch does run) leaves the logits unchanged
    with torch.no_grad(), hf.patch(model, "dense"), analysis.hooks(model) as h:
        h.perturb({head: 0.0 for head in heads})
        torch.testing.assert_close(model(ids).logits[:, -1].float(), plain, rtol=0, atol=1e-6)
    # and the unpatched model agrees (the guidance patches and unpatches around its calls)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, -1], plain, rtol=1e-5, atol=1e-5)
    assert not any(hasattr(m, "_blockattn_hooks") for m in model.modules())


@pytest.mark.parametrize("strength,guidance", [(1.0, 1.0), (0.4, 2.5), (0.7, -0.5)])
def test_guided_logits_equal_the_formula_on_an_eager_twin(strength, guidance):
    model = tiny_llama(1)
    ids = torch.randint(0, VOCAB, (3, 9))
    heads = [(0, 2), (1, 0), (1, 3)]
    plain = eager_next_logits(model, ids)
    weak = eager_next_logits(model, ids, {h: strength for h in heads})
    assert (plain - weak).abs().max() > 1e-3  # the perturbation matters, so the check can fail
    want = plain + guidance * (plain - weak)
    got = guided_logits(model, ids, heads, strength=strength, guidance=guidance)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_guided_generate_is_greedy_on_guided_logits():
    model = tiny_llama(2)
    ids = torch.randint(0, VOCAB, (2, 6))
    heads = [(0, 0), (1, 1)]
    out = guided_generate(model, ids, heads, strength=0.8, guidance=2.0, max_new_tokens=4)
    assert out.shape == (2, 10) and torch.equal(out[:, :6], ids)
    prefix = ids
    for step in range(4):
        plain = eager_next_logits(model, prefix)
        weak = eager_next_logits(model, prefix, {h: 0.8 for h in heads})
        token = (plain + 2.0 * (plain - weak)).argmax(-1)
        assert torch.equal(out[:, 6 + step], token)
        prefix = torch.cat([prefix, token[:, None]], dim=1)
    plain_out = guided_generate(model, ids, heads, guidance=0.0, max_new_tokens=3)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(plain_out, want)


def test_bad_arguments():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(TypeError, match="ids"):
        guided_logits(model, ids.tolist(), [(0, 0)])
    with pytest.raises(ValueError, match="ids"):
        guided_logits(model, ids.float(), [(0, 0)])
    with pytest.raises(ValueError, match="strength"):
        guided_logits(model, ids, [(0, 0)], strength=1.5)
    with pytest.raises(ValueError, match="head"):
        guided_logits(model, ids, [(5, 0)])
    with pytest.raises(TypeError, match="heads"):
        guided_logits(model, ids, 3)
    with pytest.raises(TypeError, match="max_new_tokens"):
        guided_generate(model, ids, [(0, 0)], max_new_tokens=2.0)
