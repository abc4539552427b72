"""DPENet blocks against their equations written out directly (explicit dilated convs), fwd and bwd."""
import pytest
import torch
import torch.nn.functional as F

from blockattn.modules import DDRB, DPENet, ERPAB


def _c(conv, x):
    d = conv.dilation[0]
    return F.conv2d(x, conv.weight, conv.bias, padding=d, dilation=d)


def naive_ddrb(m, x):
    c = m.convs
    x1 = _c(c[1], F.relu(_c(c[0], x)))
    x2 = _c(c[3], F.relu(_c(c[2], F.relu(x + x1))))
    x3 = _c(c[5], F.relu(_c(c[4], F.relu(x + x1 + x2))))
    return F.relu(x + x1 + x2 + x3)


def naive_erpab(m, x):
    cat = torch.cat([_c(b, x) for b in m.branches], 1)
    f = F.relu(torch.einsum("oc,bchw->bohw", m.merge.weight[:, :, 0, 0], cat) + m.merge.bias[None, :, None, None])
    a = torch.sigmoid(_c(m.attention[2], F.relu(_c(m.attention[0], f))))
    return F.relu(f * a + x)


@pytest.mark.parametrize("make,naive", [(lambda: DDRB(8), naive_ddrb), (lambda: ERPAB(8, 4), naive_erpab)])
def test_blocks_match_naive_forward_and_backward(make, naive):
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, 8, 12, 11, requires_grad=True)
    out, ref = m(x), naive(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.shape == x.shape and (out >= 0).all()
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(DDRB()) == 55_296 and count(ERPAB()) == 31_328
    assert count(DPENet()) == 647_328 and count(DPENet(ddrbs=5)) == 370_848


def test_zero_attention_weights_give_half_gate():
    m = ERPAB(8, 8)
    with torch.no_grad():
        m.attention[2].weight.zero_()
    f = torch.rand(1, 8, 5, 5)
    torch.testing.assert_close(m.attention(f), torch.full_like(f, 0.5))


def test_dpenet_shapes_and_errors():
    net = DPENet(8, ddrbs=1, erpabs=1)
    mid, out = net(torch.rand(1, 3, 9, 7))
    assert mid.shape == out.shape == (1, 3, 9, 7)
    with pytest.raises(ValueError, match=r"\[B, C=3, H, W\]"):
        net(torch.rand(1, 1, 9, 7))
    with pytest.raises(ValueError, match="reduction"):
        ERPAB(8, 0)
