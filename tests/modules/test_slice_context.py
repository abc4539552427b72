import math

import pytest
import torch

from blockattn.modules.slice_context import ChannelContext, GlobalSliceContext, SliceEntropyContext, gaussian_bits


def naive_channel(module: ChannelContext, decoded):
    b, _, h, w = decoded.shape
    q, k, v = module.qkv_dw(module.qkv(decoded)).chunk(3, dim=1)
    q, k, v = (t.reshape(b, module.slices, module.s, h * w) for t in (q, k, v))
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    attn = torch.softmax(q @ k.transpose(-1, -2) * module.temperature, dim=-1)  # [B, slices, S, S]
    return module.proj((attn @ v).reshape(b, -1, h, w))


def naive_global(module: GlobalSliceContext, decoded):
    b, _, h, w = decoded.shape
    q, k = module.qk(decoded).chunk(2, dim=1)
    v = module.v(decoded[:, -module.s:])
    split = lambda t: t.reshape(b, module.heads, -1, h * w).transpose(-1, -2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return module.proj((attn @ v).transpose(-1, -2).reshape(b, -1, h, w))


@pytest.mark.parametrize("cls,naive,kwargs", [(ChannelContext, naive_channel, dict(out_channels=6)),
                                              (GlobalSliceContext, naive_global, dict(dim=8, heads=2))])
def test_contexts_equal_their_naive_twins_forward_and_backward(cls, naive, kwargs):
    torch.manual_seed(0)
    module = cls(4, 3, **kwargs)
    with torch.no_grad():
        if cls is ChannelContext:
            module.temperature.uniform_(0.5, 3.0)  # distinct per head, so a mixed-up head would show
    x = torch.randn(2, 12, 9, 7, requires_grad=True)
    out = module(x)
    want = naive(module, x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    want_grads = torch.autograd.grad(want.square().sum(), [x, *module.parameters()])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_global_context_reads_every_position_and_only_the_latest_slice_as_values():
    torch.manual_seed(1)
    module = GlobalSliceContext(4, 2, dim=8, heads=2)
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    out = module(x)
    grad = torch.autograd.grad(out[0, :, 0, 0].sum(), x)[0]
    assert (grad[0, :, 5, 5].abs() > 0).all()  # a far position matters (global attention)


def test_entropy_context_shapes_scale_floor_and_hyperprior_checks():
    torch.manual_seed(2)
    ctx = SliceEntropyContext(4, 2, hyper_channels=3)
    decoded, hyper = torch.randn(2, 8, 5, 5), torch.randn(2, 3, 5, 5)
    mean, scale = ctx(decoded, hyper)
    assert mean.shape == scale.shape == (2, 4, 5, 5) and (scale >= 0.11).all()
    with pytest.raises(ValueError, match="hyper must be given"):
        ctx(decoded)
    with pytest.raises(ValueError, match="hyper must have shape"):
        ctx(decoded, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="hyper was given"):
        SliceEntropyContext(4, 2)(decoded, hyper)
    with pytest.raises(ValueError, match="decoded must have shape"):
        ctx(torch.randn(2, 7, 5, 5), hyper)
    with pytest.raises(TypeError, match="decoded must be a torch.Tensor"):
        ctx(decoded.numpy(), hyper)
    with pytest.raises(ValueError, match="slice_channels"):
        SliceEntropyContext(0, 2)
    with pytest.raises(ValueError, match="multiple of heads"):
        GlobalSliceContext(4, 2, dim=9, heads=2)


def test_gaussian_bits_is_the_discretised_gaussian_likelihood():
    torch.manual_seed(3)
    y, mean, scale = torch.randn(50) * 3, torch.randn(50), torch.rand(50) + 0.2
    cdf = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    q = torch.round(y)
    q, m, s = q.double(), mean.double(), scale.double()  # float64 and CompressAI's likelihood floor
    want = -torch.log2((cdf((q + 0.5 - m) / s) - cdf((q - 0.5 - m) / s)).clamp_min(1e-9)).sum()
    torch.testing.assert_close(gaussian_bits(y.double(), m, s), want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gaussian_bits(y, mean, scale).double(), want, atol=0, rtol=1e-3)  # fp32 tails
    # a sharper, centred prediction codes the same integers in fewer bits
    q = torch.round(y)
    assert gaussian_bits(q, q, torch.full_like(q, 0.2)) < gaussian_bits(q, torch.zeros_like(q), torch.ones_like(q))
