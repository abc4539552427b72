"""The hook API against naive eager computations on a tiny random Llama: rows, outputs, edits."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import analysis, hf  # noqa: E402
from blockattn.analysis.hooks import attention_rows, uniform_outputs  # noqa: E402

HEADS, KV_HEADS, DIM = 4, 2, 8


def tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=HEADS * DIM, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=256)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def eager_twin(model):
    twin = transformers.LlamaForCausalLM(model.config).eval()
    twin.load_state_dict(model.state_dict())
    twin.set_attn_implementation("eager")
    return twin


def o_proj_inputs(model, ids, edit=None, layer=None):
    """Eager run capturing every layer's o_proj input as [B, H, L, D]; `edit(x [B, H, L, D])` rewrites layer
    `layer`'s before it goes on."""
    seen = {}

    def pre(module, args, index):
        x = args[0].view(args[0].shape[0], args[0].shape[1], HEADS, DIM).transpose(1, 2)
        if edit is not None and index == layer:
            x = edit(x.clone())
        seen[index] = x
        return (x.transpose(1, 2).reshape(args[0].shape),)

    handles = [blk.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: pre(m, a, i))
               for i, blk in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def test_rows_and_outputs_equal_eager_attention():
    model = tiny_llama()
    eager = eager_twin(model)
    ids = torch.randint(0, 97, (2, 70))
    positions = [0, 5, 33, 69]
    with torch.no_grad():
        want = eager(ids, output_attentions=True).attentions
    _, want_out = o_proj_inputs(eager, ids)
    with torch.no_grad(), hf.patch(model, "dense"), analysis.hooks(model) as h:
        h.record_rows(positions)
        h.record_outputs(positions=[33, 69])
        model(ids)
    for layer in range(2):
        (record,) = h.rows[layer]
        assert record.positions.tolist() == positions and record.indices is None
        assert record.probs.shape == (2, HEADS, 4, 70)
        torch.testing.assert_close(record.probs, want[layer][:, :, positions], atol=1e-6, rtol=1e-5)
        (out,) = h.outputs[layer]
        torch.testing.assert_close(out, want_out[layer][:, :, [33, 69]], atol=1e-6, rtol=1e-5)
    assert not any(hasattr(m, "_blockattn_hooks") for m in model.modules())


def test_decode_rows_top_k_and_padding():
    model = tiny_llama(1)
    eager = eager_twin(model)
    ids = torch.randint(0, 97, (2, 41))
    mask = torch.ones(2, 41, dtype=torch.long)
    mask[1, :6] = 0  # left padding of row 1
    with torch.no_grad():
        want = eager(ids, attention_mask=mask, output_attentions=True).attentions
    with torch.no_grad(), hf.patch(model, "dense"):
        cache = model(ids[:, :40], attention_mask=mask[:, :40], use_cache=True).past_key_values
        with analysis.hooks(model) as h:
            h.record_rows([40], top_k=3)
            model(ids[:, 40:], attention_mask=mask, past_key_values=cache, use_cache=True)
    for layer in range(2):
        (record,) = h.rows[layer]
        values, indices = want[layer][:, :, 40:41].topk(3, dim=-1)
        torch.testing.assert_close(record.probs, values, atol=1e-6, rtol=1e-5)
        assert torch.equal(record.indices, indices)
        assert (record.indices[1] >= 6).all()  # padding never attended


def naive_rows_and_uniform(q, k, v, causal, window, mask):
    """The L x L way: every query's full masked row, then the rows asked for."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, 1)
    v_rep = v.repeat_interleave(heads // kv_heads, 1)
    q_len, k_len = q.shape[2], k.shape[2]
    i = torch.arange(k_len - q_len, k_len).view(-1, 1)
    j = torch.arange(k_len).view(1, -1)
    keep = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (j > i - window) & ((j <= i) if causal else (j < i + window))
    keep = keep[None, None] & mask.bool()[:, None, None, :]
    logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
    uniform = (keep.double() @ v_rep.double()) / keep.double().sum(-1, keepdim=True).clamp(min=1)
    return probs, uniform


@pytest.mark.parametrize("causal,window", [(True, None), (True, 7), (False, None), (False, 5)])
def test_attention_rows_and_uniform_against_naive(causal, window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    mask = torch.ones(2, 30)
    mask[0, :3] = 0
    probs, uniform = naive_rows_and_uniform(q, k, v, causal, window, mask)
    rows = torch.tensor([0, 4, 8])
    got = attention_rows(q, k, rows, causal=causal, window=window, attention_mask=mask)
    torch.testing.assert_close(got.double(), probs[:, :, rows], atol=1e-6, rtol=1e-5)
    got_uniform = uniform_outputs(v, 9, causal=causal, window=window, attention_mask=mask)
    torch.testing.assert_close(got_uniform.repeat_interleave(2, 1).double(), uniform, atol=1e-6, rtol=1e-5)


def _patched_logits(model, ids, edit):
    with torch.no_grad(), hf.patch(model, "dense"), analysis.hooks(model) as h:
        edit(h)
        return model(ids).logits


def test_ablation_equals_editing_the_o_proj_input():
    model = tiny_llama(2)
    eager = eager_twin(model)
    ids = torch.randint(0, 97, (1, 50))
    clean, _ = o_proj_inputs(eager, ids)
    for head in (0, 3):
        def zero(x, head=head):
            x[:, head] = 0
            return x
        want, _ = o_proj_inputs(eager, ids, zero, layer=0)
        got = _patched_logits(model, ids, lambda h: h.ablate({(0, head): "zero"}))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got - clean).abs().max() > 1e-3  # the ablation changed something
    mean = torch.randn(DIM)

    def set_mean(x):
        x[:, 2] = mean
        return x
    want, _ = o_proj_inputs(eager, ids, set_mean, layer=1)
    torch.testing.assert_close(_patched_logits(model, ids, lambda h: h.ablate({(1, 2): mean})), want,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_patched_logits(model, ids, lambda h: h.ablate({(1, 2): lambda out: mean + 0 * out})),
                               want, atol=1e-5, rtol=1e-5)


def test_uniform_ablation_and_identity_perturbation():
    model = tiny_llama(3)
    eager = eager_twin(model)
    ids = torch.randint(0, 97, (1, 45))
    values = {}
    def keep_v(module, args, out):
        values["v"] = out.view(1, 45, KV_HEADS, DIM).transpose(1, 2)
    hook = eager.model.layers[1].self_attn.v_proj.register_forward_hook(keep_v)
    _, clean = o_proj_inputs(eager, ids)
    hook.remove()
    v = values["v"][:, 1]  # head 3 reads KV head 1
    uniform = v.cumsum(1) / torch.arange(1, 46).view(1, -1, 1)

    def set_uniform(x):
        x[:, 3] = uniform
        return x
    want, _ = o_proj_inputs(eager, ids, set_uniform, layer=1)
    torch.testing.assert_close(_patched_logits(model, ids, lambda h: h.ablate({(1, 3): "uniform"})), want,
                               atol=1e-5, rtol=1e-5)
    for u in (0.0, 0.3, 1.0):
        def soft(x, u=u):
            x[:, 3] = (1 - u) * clean[1][:, 3] + u * v
            return x
        want, _ = o_proj_inputs(eager, ids, soft, layer=1)
        torch.testing.assert_close(_patched_logits(model, ids, lambda h: h.perturb({(1, 3): u})), want,
                                   atol=1e-5, rtol=1e-5)


def test_no_edit_is_bit_identical_and_mean_outputs():
    model = tiny_llama(4)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad(), hf.patch(model, "dense"):
        plain = model(ids).logits
        with analysis.hooks(model) as h:
            h.record_outputs()
            hooked = model(ids).logits
            h.perturb({(0, 1): 0.0})
            assert torch.equal(model(ids).logits, plain)
        assert torch.equal(hooked, plain)
        means = h.mean_outputs()
    assert means.shape == (2, HEADS, DIM)
    torch.testing.assert_close(means[1], h.outputs[1][0].mean(dim=(0, 2)))


def test_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="not patched"):
        analysis.hooks(model)
    with pytest.raises(TypeError, match="nn.Module"):
        analysis.hooks("model")
    with hf.patch(model, "dense", kv="knorm:ratio=0.5"), pytest.raises(ValueError, match="kv="):
        analysis.hooks(model)  # a shrunken cache's positions are not token positions
    with hf.patch(model, "dense"), analysis.hooks(model) as h:
        with pytest.raises(ValueError, match="already has"):
            analysis.hooks(model)
        with pytest.raises(ValueError, match="outside"):
            h.ablate({(2, 0): "zero"})
        with pytest.raises(TypeError, match="pairs"):
            h.ablate({0: "zero"})
        with pytest.raises(ValueError, match="one of"):
            h.ablate({(0, 0): "mean"})
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            h.perturb({(0, 0): 1.5})
        with pytest.raises(ValueError, match="positions"):
            h.record_rows([-1])
        with pytest.raises(ValueError, match="top_k"):
            h.record_rows([1], top_k=0)
        with pytest.raises(ValueError, match="layers"):
            h.record_outputs(layers=[5])
        h.ablate({(0, 0): torch.zeros(3)})
        with pytest.raises(ValueError, match="broadcast"), torch.no_grad():
            model(torch.randint(0, 97, (1, 10)))
        with pytest.raises(ValueError, match="no outputs"):
            h.mean_outputs()
