"""EAB and the SAB reconstruction against their equations written out directly, forward and backward."""
import pytest
import torch

from blockattn.modules import EmbeddingAttention, SentenceAttentionBlock


def _ln(x, norm):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def naive_eab(m, f, t):
    l1, ln, _, l2 = m.mlp
    z = torch.relu(_ln(t @ l1.weight.T + l1.bias, ln)) @ l2.weight.T + l2.bias
    a = torch.exp(z - z.max(-1, keepdim=True).values)
    return f * (a / a.sum(-1, keepdim=True))[:, :, None, None]


def naive_sab(m, f, t):
    z = torch.cat([f.sum((2, 3)) / (f.shape[2] * f.shape[3]), t], 1)
    s = 1 / (1 + torch.exp(-(torch.relu(z @ m.fc1.weight.T + m.fc1.bias) @ m.fc2.weight.T + m.fc2.bias)))
    return f * s[:, :, None, None]


@pytest.mark.parametrize("make,naive", [(lambda: EmbeddingAttention(12, 10), naive_eab),
                                        (lambda: SentenceAttentionBlock(10, 12, reduction=2), naive_sab)])
def test_matches_naive_forward_and_backward(make, naive):
    torch.manual_seed(0)
    m = make()
    f, t = torch.randn(3, 10, 4, 5, requires_grad=True), torch.randn(3, 12, requires_grad=True)
    out, ref = m(f, t), naive(m, f, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [f, t, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_eab_gate_is_a_channel_distribution_independent_of_the_image():
    m = EmbeddingAttention()
    assert sum(p.numel() for p in m.parameters()) == 1_578_112
    t = torch.randn(2, 384)
    g = m.gate(t)
    torch.testing.assert_close(g.sum(1), torch.ones(2, 1, 1))
    f1, f2 = torch.randn(2, 640, 3, 3), torch.randn(2, 640, 3, 3)
    torch.testing.assert_close(m(f1, t) / f1, m(f2, t) / f2, rtol=1e-4, atol=1e-6)


def test_sab_with_silent_sentence_is_squeeze_excitation():
    torch.manual_seed(1)
    m = SentenceAttentionBlock(16, 8, reduction=4)
    with torch.no_grad():
        m.fc1.weight[:, 16:].zero_()
    f = torch.randn(2, 16, 3, 3)
    gate = m.gate(f, torch.randn(2, 8))
    assert ((gate > 0) & (gate < 1)).all()
    se = torch.sigmoid(m.fc2(torch.relu(f.mean((2, 3)) @ m.fc1.weight[:, :16].T + m.fc1.bias)))
    torch.testing.assert_close(gate[:, :, 0, 0], se)


def test_sentence_attention_errors():
    m = EmbeddingAttention(8, 4)
    with pytest.raises(ValueError, match=r"\[B=2, E=8\]"):
        m(torch.randn(2, 4, 3, 3), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\[B, C=4, H, W\]"):
        m(torch.randn(2, 5, 3, 3), torch.randn(2, 8))
    with pytest.raises(TypeError, match="sentence must be a torch.Tensor"):
        m(torch.randn(2, 4, 3, 3), [0.0] * 8)
    with pytest.raises(ValueError, match="reduction"):
        SentenceAttentionBlock(8, 4, reduction=0)
