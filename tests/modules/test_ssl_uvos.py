"""SSL-UVOS: the spatio-temporal block and its attention rows against explicit softmax attention
(fwd and bwd), key-frame attention, symmetric KL and the hierarchical clustering."""
import pytest
import torch
import torch.nn.functional as F

from blockattn.modules import SpatioTemporalBlock, hierarchical_cluster, symmetric_kl


def _naive_probs(m, x):
    b, n, d = x.shape
    xn = F.layer_norm(x, (d,), m.norm1.weight, m.norm1.bias, m.norm1.eps)
    q, k, v = (xn @ m.qkv.weight.T).view(b, n, 3, m.heads, -1).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-1, -2) / (d // m.heads) ** 0.5, -1), v


def naive_block(m, x):
    b, n, d = x.shape
    p, v = _naive_probs(m, x)
    x = x + ((p @ v).transpose(1, 2).reshape(b, n, d) @ m.proj.weight.T + m.proj.bias)
    first, _, _, second, _ = m.mlp
    h = F.gelu(F.layer_norm(x, (d,), m.norm2.weight, m.norm2.bias, m.norm2.eps) @ first.weight.T + first.bias)
    return x + h @ second.weight.T + second.bias


def test_block_matches_naive_forward_and_backward():
    torch.manual_seed(0)
    m = SpatioTemporalBlock(16, 4).eval()
    x = torch.randn(2, 3 * (1 + 6), 16, requires_grad=True)
    out, ref = m(x), naive_block(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    rows = m.attention_rows(x, torch.tensor([0, 5, 20]))
    torch.testing.assert_close(rows, _naive_probs(m, x)[0].mean(1)[:, [0, 5, 20]])
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 3))


def test_key_frame_attention():
    torch.manual_seed(1)
    m = SpatioTemporalBlock(8, 2)
    feats = torch.randn(7, 5, 8)
    att = m.key_frame_attention(feats, ratio=3, chunk=4)
    assert att.shape == (7, 5, 2 * 5)
    d = feats.shape[-1]
    xn = F.layer_norm(feats, (d,), m.norm1.weight, m.norm1.bias, m.norm1.eps)
    q, k, _ = (xn @ m.qkv.weight.T).view(7, 5, 3, 2, 4).permute(2, 3, 0, 1, 4)   # [3, h, T, HW, d]
    keys = k[:, [0, 3]].reshape(2, 10, 4)
    ref = torch.softmax(q.reshape(2, 35, 4) @ keys.transpose(1, 2) / 2.0, -1).mean(0).view(7, 5, 10)
    torch.testing.assert_close(att, ref)


def test_symmetric_kl():
    p = torch.softmax(torch.randn(4, 6), -1)
    q = torch.softmax(torch.randn(3, 6), -1)
    d = symmetric_kl(p, q)
    ref = torch.stack([torch.stack([((a - b) * (a.log() - b.log())).sum() for b in q]) for a in p])
    torch.testing.assert_close(d, ref)
    torch.testing.assert_close(symmetric_kl(p, p).diagonal(), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(symmetric_kl(p, q), symmetric_kl(q, p).T)


def test_clustering_recovers_separated_groups():
    torch.manual_seed(2)
    a, b = torch.softmax(torch.tensor([4.0, 0, 0, 0]), 0), torch.softmax(torch.tensor([0, 0, 0, 4.0]), 0)
    truth = torch.rand(6, 10) < 0.4
    att = torch.where(truth[..., None], a, b) + 0.01 * torch.rand(6, 10, 4)
    labels = hierarchical_cluster(att, tau=1.0)
    assert labels.max() == 1
    assert ((labels == labels[truth][0]) == truth).all()
    assert hierarchical_cluster(att, tau=1e6).max() == 0
    distinct = torch.softmax(torch.randn(2, 3, 5) * 3, -1)
    assert hierarchical_cluster(distinct, tau=0.0).max() == 5


def test_ssl_uvos_errors():
    with pytest.raises(ValueError, match="heads"):
        SpatioTemporalBlock(10, 4)
    m = SpatioTemporalBlock(8, 2)
    with pytest.raises(ValueError, match="ratio"):
        m.key_frame_attention(torch.randn(3, 4, 8), ratio=5)
    with pytest.raises(TypeError, match="queries"):
        m.attention_rows(torch.randn(1, 4, 8), [0])
    with pytest.raises(ValueError, match="tau"):
        hierarchical_cluster(torch.rand(2, 3, 4), tau=-1)
