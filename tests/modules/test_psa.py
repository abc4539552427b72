"""PSA against its equations written out directly (paper and official forms), forward and backward."""
import pytest
import torch

from blockattn.modules import PolarizedSelfAttention

COMBOS = [(layout, form) for layout in ("parallel", "sequential") for form in ("paper", "official")]


def _conv1x1(conv, x):
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias[None, :, None, None]


def _naive_channel_gate(m, x):
    b, c, h, w = x.shape
    v = _conv1x1(m.ch_wv, x).reshape(b, c // 2, h * w)
    q = torch.softmax(_conv1x1(m.ch_wq, x).reshape(b, h * w), dim=-1)
    z = torch.einsum("bcn,bn->bc", v, q)[:, :, None, None]
    if m.form == "paper":
        z = _conv1x1(m.ch_wz, z).flatten(1)
        mu, var = z.mean(1, keepdim=True), z.var(1, unbiased=False, keepdim=True)
        z = (z - mu) / torch.sqrt(var + m.ch_norm.eps) * m.ch_norm.weight + m.ch_norm.bias
        return torch.sigmoid(z)[:, :, None, None]
    if m.layout == "parallel":
        return torch.sigmoid(_conv1x1(m.ch_wz, z))
    conv_a, norm, _, conv_b = m.ch_wz
    z = _conv1x1(conv_a, z).flatten(1)
    mu, var = z.mean(1, keepdim=True), z.var(1, unbiased=False, keepdim=True)
    z = torch.relu((z - mu) / torch.sqrt(var + norm.eps) * norm.weight[:, 0, 0] + norm.bias[:, 0, 0])
    return torch.sigmoid(_conv1x1(conv_b, z[:, :, None, None]))


def _naive_spatial_gate(m, x):
    b, c, h, w = x.shape
    v = _conv1x1(m.sp_wv, x).reshape(b, c // 2, h * w)
    g = _conv1x1(m.sp_wq, x).mean((2, 3))
    if m.form == "paper":
        s = torch.einsum("bc,bcn->bn", torch.softmax(g, dim=-1), v)
    elif m.layout == "parallel":
        s = torch.softmax(torch.einsum("bc,bcn->bn", g, v), dim=-1)
    else:
        s = torch.einsum("bc,bcn->bn", g, torch.softmax(v, dim=-1))
    return torch.sigmoid(s).reshape(b, 1, h, w)


def naive_psa(m, x):
    if m.layout == "parallel":
        return _naive_channel_gate(m, x) * x + _naive_spatial_gate(m, x) * x
    y = _naive_channel_gate(m, x) * x
    return _naive_spatial_gate(m, y) * y


@pytest.mark.parametrize("layout,form", COMBOS)
def test_psa_matches_naive_forward_and_backward(layout, form):
    torch.manual_seed(0)
    m = PolarizedSelfAttention(16, layout=layout, form=form)
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    out, ref = m(x), naive_psa(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    params = [x] + list(m.parameters())
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, params, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_wide_values_split_into_engine_chunks():
    # 16 x 20 = 320 pixels: the spatial branch's value width exceeds one engine head
    torch.manual_seed(1)
    m = PolarizedSelfAttention(8, form="paper")
    x = torch.randn(1, 8, 16, 20)
    torch.testing.assert_close(m(x), naive_psa(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,form,count", [("parallel", "official", 524_800), ("sequential", "official", 443_584),
                                               ("parallel", "paper", 527_105)])
def test_parameter_counts(layout, form, count):
    m = PolarizedSelfAttention(512, layout=layout, form=form)
    assert sum(p.numel() for p in m.parameters()) == count


def test_gates_are_polarized_and_bounded():
    m = PolarizedSelfAttention(8)
    x = torch.randn(3, 8, 4, 6)
    a_ch, a_sp = m.channel_gate(x), m.spatial_gate(x)
    assert a_ch.shape == (3, 8, 1, 1) and a_sp.shape == (3, 1, 4, 6)
    assert ((a_ch > 0) & (a_ch < 1)).all() and ((a_sp > 0) & (a_sp < 1)).all()


def test_paper_form_softmax_invariance():
    torch.manual_seed(2)
    m = PolarizedSelfAttention(8)
    x = torch.randn(2, 8, 4, 4)
    a_ch, a_sp = m.channel_gate(x), m.spatial_gate(x)
    with torch.no_grad():
        m.ch_wq.bias += 3.0   # a constant on every HW logit
        m.sp_wq.bias += 3.0   # a constant on every pooled channel logit
    torch.testing.assert_close(m.channel_gate(x), a_ch, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.spatial_gate(x), a_sp, rtol=1e-6, atol=1e-6)


def test_sequential_with_open_channel_gate_is_the_spatial_branch():
    torch.manual_seed(3)
    for form in ("paper", "official"):
        m = PolarizedSelfAttention(16, layout="sequential", form=form)
        with torch.no_grad():
            last = m.ch_norm if form == "paper" else m.ch_wz[-1]
            last.bias.fill_(50.0)   # sigmoid(50) == 1 in fp32: A_ch == 1
        x = torch.randn(2, 16, 3, 5)
        torch.testing.assert_close(m(x), m.spatial_gate(x) * x, rtol=1e-6, atol=1e-6)


def test_paper_and_official_forms_differ():
    torch.manual_seed(4)
    paper = PolarizedSelfAttention(8, form="paper")
    official = PolarizedSelfAttention(8, form="official")
    with torch.no_grad():
        for name in ("ch_wv", "ch_wq", "sp_wv", "sp_wq"):
            getattr(official, name).weight.copy_(getattr(paper, name).weight)
            getattr(paper, name).bias.zero_()
        official.ch_wz.weight.copy_(paper.ch_wz.weight)
    x = torch.randn(2, 8, 4, 4)
    assert not torch.allclose(paper(x), official(x), atol=1e-3)


def test_psa_errors():
    with pytest.raises(ValueError, match="channels"):
        PolarizedSelfAttention(7)
    with pytest.raises(ValueError, match="channels"):
        PolarizedSelfAttention(12, layout="sequential", form="official")
    with pytest.raises(ValueError, match="layout"):
        PolarizedSelfAttention(8, layout="both")
    with pytest.raises(ValueError, match="form"):
        PolarizedSelfAttention(8, form="v2")
    m = PolarizedSelfAttention(8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m([1.0])
    with pytest.raises(ValueError, match=r"\[B, C=8, H, W\]"):
        m(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, C=8, H, W\]"):
        m(torch.randn(8, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(1, 8, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(1, 8, 4, 4, dtype=torch.float64))
