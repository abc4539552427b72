"""NiNformer block against its equations written out directly, forward and backward."""
import pytest
import torch

from blockattn.modules import NiNBlock


def _ln(x, norm):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _mlp(x, seq):
    first, _, _, second, _ = seq
    h = x @ first.weight.T + first.bias
    h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    return h @ second.weight.T + second.bias


def naive_block(m, x):
    xn = _ln(x, m.norm)
    u = xn @ m.gate_proj.weight.T + m.gate_proj.bias
    y1 = xn + _mlp(_ln(xn, m.token_norm).transpose(1, 2), m.token_mlp).transpose(1, 2)
    v = y1 + _mlp(_ln(y1, m.channel_norm), m.channel_mlp)
    x = x + u * v
    return x + _mlp(_ln(x, m.norm), m.ffn)


def test_block_matches_naive_forward_and_backward():
    torch.manual_seed(0)
    m = NiNBlock(12, 20, 9)
    x = torch.randn(3, 9, 12, requires_grad=True)
    out, ref = m(x), naive_block(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_parameter_count_and_shared_norm():
    m = NiNBlock(256, 512, 64)
    assert sum(p.numel() for p in m.parameters()) == 659_264
    assert sum(isinstance(mod, torch.nn.LayerNorm) for mod in m.modules()) == 3


def test_unit_gate_gives_the_mixer():
    torch.manual_seed(1)
    m = NiNBlock(8, 16, 5)
    with torch.no_grad():
        m.gate_proj.weight.zero_()
        m.gate_proj.bias.fill_(1.0)
    x = torch.randn(2, 5, 8)
    xn = m.norm(x)
    mid = x + m.mixer(xn)
    torch.testing.assert_close(m(x), mid + m.ffn(m.norm(mid)))


def test_token_order_matters():
    torch.manual_seed(2)
    m = NiNBlock(8, 16, 6)
    x = torch.randn(1, 6, 8)
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    assert not torch.allclose(m(x[:, perm]), m(x)[:, perm], atol=1e-4)


def test_ninformer_errors():
    with pytest.raises(ValueError, match="num_tokens"):
        NiNBlock(8, 16, 0)
    with pytest.raises(ValueError, match="dropout"):
        NiNBlock(8, 16, 4, dropout=1.5)
    m = NiNBlock(8, 16, 4)
    with pytest.raises(ValueError, match=r"\[B, N=4, D=8\]"):
        m(torch.randn(1, 5, 8))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m(3)
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(1, 4, 8, dtype=torch.float64))
