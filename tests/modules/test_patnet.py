"""PATNet mixers and block against their equations written out directly (eval-mode BN), fwd and bwd."""
import pytest
import torch
import torch.nn.functional as F

from blockattn.modules import PATBlock, PATChannel, PATSelf, PATSpatial


def _bn(x, bn):
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * \
        bn.weight.view(shape) + bn.bias.view(shape)


def _hsig(x):
    return torch.clamp(x / 6 + 0.5, 0, 1)


def _conv1x1(conv, x):
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)


def naive_pat_ch(m, x):
    cp = m.touched
    x1, x2 = x[:, :cp], x[:, cp:]
    n = x2.shape[2] * x2.shape[3]
    mean = x2.sum((2, 3)) / n
    std = torch.sqrt(((x2 - mean[..., None, None]) ** 2).sum((2, 3)) / (n - 1))
    w = m.style_conv.weight[:, :, 0]                              # [u, u, 2]
    s = torch.einsum("oc,bc->bo", w[..., 0], mean) + torch.einsum("oc,bc->bo", w[..., 1], std)
    g = _hsig(_bn(s[..., None, None], m.style_norm))
    return torch.cat([F.conv2d(x1, m.conv.weight, padding=1), _bn(x2 * g, m.out_norm)], 1)


def naive_pat_sp(m, x):
    a, b = x.chunk(2, 1)
    a = _bn(a * _hsig(_conv1x1(m.gate_conv, a)), m.gate_norm)
    return torch.cat([a, _conv1x1(m.rest_conv, _bn(b, m.rest_norm))], 1)


def naive_pat_sf(m, x):
    cp, heads = m.touched, m.heads
    x1, x2 = x[:, :cp], x[:, cp:]
    b, u, h, w = x2.shape
    t = x2.flatten(2).transpose(1, 2)
    mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    t = (t - mu) / torch.sqrt(var + m.norm.eps) * m.norm.weight + m.norm.bias
    q, k, v = (t @ m.qkv.weight.T).split(u, -1)
    q, k, v = (z.reshape(b, h * w, heads, -1).transpose(1, 2) for z in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
    o = (p @ v).transpose(1, 2).reshape(b, h * w, u) @ m.proj.weight.T + m.proj.bias
    return torch.cat([F.conv2d(x1, m.conv.weight, padding=1), o.transpose(1, 2).reshape(b, u, h, w)], 1)


def naive_block(m, x):
    mixer = naive_pat_ch if m.mixer_kind == "ch" else naive_pat_sf

    def mlp(y):
        conv_a, bn, _, conv_b, *sp = m.mlp
        y = _conv1x1(conv_b, F.gelu(_bn(_conv1x1(conv_a, y), bn)))
        return naive_pat_sp(sp[0], y) if sp else y
    if m.mixer_kind == "ch":
        return x + mlp(mixer(m.mixer, x))
    x = x + mixer(m.mixer, x)
    return x + mlp(x)


def _randomize_bn(module):
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            torch.nn.init.normal_(bn.weight, 1.0, 0.2)
            torch.nn.init.normal_(bn.bias, 0.0, 0.2)


@pytest.mark.parametrize("make,naive", [
    (lambda: PATChannel(16), naive_pat_ch),
    (lambda: PATSpatial(16), naive_pat_sp),
    (lambda: PATSelf(16, heads=2), naive_pat_sf),
    (lambda: PATBlock(16), naive_block),
    (lambda: PATBlock(16, spatial_attn=True), naive_block),
    (lambda: PATBlock(16, mixer="sf", heads=3), naive_block),
])
def test_matches_naive_forward_and_backward(make, naive):
    torch.manual_seed(0)
    m = make().eval()
    with torch.no_grad():
        _randomize_bn(m)
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    out, ref = m(x), naive(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(PATChannel(64)) == 7_104
    assert count(PATSpatial(64)) == 1_184
    assert count(PATBlock(64)) == 23_744
    assert count(PATSelf(256)) == 185_220 - 4 * 81   # the official count less the iRPE tables


def test_split_is_exact():
    torch.manual_seed(1)
    m = PATChannel(16).eval()
    with torch.no_grad():
        m.conv.weight.zero_()
    x = torch.randn(2, 16, 4, 4)
    out = m(x)
    assert (out[:, :4] == 0).all()
    x2 = x.clone()
    x2[:, :4] = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(m(x2)[:, 4:], out[:, 4:])


def test_gate_of_constant_channels_depends_on_mean_only():
    m = PATChannel(8).eval()
    x = torch.ones(1, 6, 5, 5) * torch.arange(6.0)[None, :, None, None]
    with torch.no_grad():
        m.style_conv.weight[..., 0].zero_()   # only the std column is left: std = 0 gives hardsigmoid(BN(0))
    g = m.gate(x)
    torch.testing.assert_close(g, torch.full_like(g, 0.5))


def test_zero_spatial_weights_give_half_gate():
    m = PATSpatial(8).eval()
    with torch.no_grad():
        m.gate_conv.weight.zero_()
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(m(x)[:, :4], m.gate_norm(x[:, :4] * 0.5))


def test_patnet_errors():
    with pytest.raises(ValueError, match="n_div"):
        PATChannel(3, n_div=4)
    with pytest.raises(ValueError, match="heads"):
        PATSelf(16, heads=5)
    with pytest.raises(ValueError, match="even"):
        PATSpatial(7)
    with pytest.raises(ValueError, match="mixer"):
        PATBlock(16, mixer="se")
    m = PATBlock(16)
    with pytest.raises(ValueError, match=r"\[B, C=16, H, W\]"):
        m(torch.randn(2, 8, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m(None)
