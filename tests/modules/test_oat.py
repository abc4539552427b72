"""OAT: the whole forward written out with explicit softmax attention (fwd and bwd), the learned
positional table against its Gaussian cosine target, the positional code and the stop logit."""
import math

import pytest
import torch

from blockattn.modules import (ObjectAttentionTransformer, ObjectCrossAttention, ObjectPositionalEncoding,
                               fit_positional_table, positional_table_error)


def _lin(layer, x):
    return x @ layer.weight.T + layer.bias


def _ln(x, norm):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _mha(att, x, memory, is_causal):
    b, t, dim = x.shape
    h = att.heads
    q = _lin(att.q, x).view(b, t, h, -1).transpose(1, 2)
    k, v = _lin(att.kv, memory).view(b, memory.shape[1], 2, h, -1).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        s = s.masked_fill(torch.ones(t, memory.shape[1], dtype=torch.bool).triu(1), float("-inf"))
    return _lin(att.proj, (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, dim))


def _layer(layer, x, memory=None):
    cross = layer.cross_attn is not None
    x = _ln(x + _mha(layer.self_attn, x, x, cross), layer.norms[0])
    if cross:
        x = _ln(x + _mha(layer.cross_attn, x, memory, False), layer.norms[1])
    first, _, _, second = layer.ffn
    return _ln(x + _lin(second, torch.relu(_lin(first, x))), layer.norms[-1])


def naive_oat(m, appearance, coords, target, history):
    b, n, _ = appearance.shape
    half = m.dim // 2
    code = m.position.table[coords].reshape(b, n, -1)[..., :half]
    objects = torch.cat([_lin(m.appearance, appearance), code], -1)
    tt = _lin(m.appearance, target)
    memory = torch.cat([objects, torch.cat([tt, torch.zeros_like(tt)], -1)[:, None]], 1)
    for layer in m.encoder:
        memory = _layer(layer, memory)
    steps = torch.cat([m.start.expand(b, 1, -1), torch.stack([objects[i, history[i]] for i in range(b)])], 1)
    pos = torch.arange(steps.shape[1], dtype=torch.float32)[:, None]
    den = torch.exp(-torch.arange(0, m.dim, 2, dtype=torch.float32) * math.log(10000) / m.dim)
    pe = torch.stack([torch.sin(pos * den), torch.cos(pos * den)], -1).reshape(steps.shape[1], m.dim)
    x = steps + pe
    for layer in m.decoder:
        x = _layer(layer, x, memory)
    scores = []
    for scorer in m.scorers:
        s = _lin(scorer.decode_fc, x) @ _lin(scorer.encode_fc, memory[:, :n]).transpose(1, 2)
        scores.append(torch.cat([s, torch.zeros(b, x.shape[1], 1)], -1) / math.sqrt(scorer.d_k))
    return _lin(m.readout, torch.stack(scores, -1)).squeeze(-1)


def test_oat_matches_naive_forward_and_backward():
    torch.manual_seed(0)
    table = torch.randn(5, 6)
    m = ObjectAttentionTransformer(7, 16, 4, table=table, num_encoder_layers=1, num_decoder_layers=2,
                                   ca_dk=16).eval()
    appearance = torch.randn(2, 6, 7, requires_grad=True)
    coords = torch.randint(0, 5, (2, 6, 3))
    target = torch.randn(2, 7, requires_grad=True)
    history = torch.randint(0, 6, (2, 3))
    out, ref = m(appearance, coords, target, history), naive_oat(m, appearance, coords, target, history)
    assert out.shape == (2, 4, 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [appearance, target, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal_in_the_history():
    torch.manual_seed(1)
    m = ObjectAttentionTransformer(4, 8, 2, table=torch.randn(4, 4)).eval()
    app, coords, target = torch.randn(1, 5, 4), torch.randint(0, 4, (1, 5, 2)), torch.randn(1, 4)
    a = m(app, coords, target, torch.tensor([[0, 1, 2]]))
    b = m(app, coords, target, torch.tensor([[0, 1, 4]]))
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_fitted_table_matches_gaussian_cosines_with_equal_norms():
    table = fit_positional_table(6, 12, sigma=1.5, iterations=250, lr=0.05)
    assert positional_table_error(table, 1.5) < 0.02
    norms = table.norm(dim=1)
    assert (norms.max() - norms.min()) / norms.mean() < 0.05
    assert positional_table_error(torch.randn(6, 12), 1.5) > 0.2   # the check can fail


def test_positional_code_and_stop_logit():
    table = torch.arange(12.0).view(4, 3)
    pe = ObjectPositionalEncoding(table, 5)
    code = pe(torch.tensor([[[1, 3]]]))
    torch.testing.assert_close(code, torch.tensor([[[3.0, 4.0, 5.0, 9.0, 10.0]]]))
    scorer = ObjectCrossAttention(4, 16)
    logits = scorer(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    assert logits.shape == (2, 5, 4) and (logits[..., 3] == 0).all()


def test_oat_errors():
    with pytest.raises(ValueError, match="dim"):
        ObjectAttentionTransformer(4, 10, 4)
    m = ObjectAttentionTransformer(4, 8, 2, table=torch.randn(4, 4))
    app, coords, target = torch.randn(1, 5, 4), torch.randint(0, 4, (1, 5, 2)), torch.randn(1, 4)
    with pytest.raises(ValueError, match="history must index"):
        m(app, coords, target, torch.tensor([[5]]))
    with pytest.raises(TypeError, match="history must be a long"):
        m(app, coords, target, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="coords must lie"):
        m(app, coords + 4, target, torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"\[B, N, A=4\]"):
        m(torch.randn(1, 5, 3), coords, target, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="sigma"):
        fit_positional_table(4, 4, sigma=0)
