"""OverLoCK ContMix: the dynamic-kernel aggregation and the whole mixer against their equations
(explicit clamped windows, softmax over taps), forward and backward; block properties."""
import pytest
import torch
import torch.nn.functional as F

from blockattn.modules import ContMix, ContMixBlock, DynamicConvBlock, contmix_aggregate


def naive_aggregate(logits, values, k, rpb):
    b, g, h, w, _ = logits.shape
    out = torch.zeros(*values.shape, dtype=values.dtype)
    for y in range(h):
        sy = min(max(y - k // 2, 0), h - k)
        for x in range(w):
            sx = min(max(x - k // 2, 0), w - k)
            a = logits[:, :, y, x]
            if rpb is not None:
                a = a + rpb[:, sy - y + k - 1:sy - y + 2 * k - 1, sx - x + k - 1:sx - x + 2 * k - 1].reshape(g, k * k)
            p = torch.softmax(a, dim=-1)                                          # [B, G, k*k]
            window = values[:, :, sy:sy + k, sx:sx + k].reshape(b, g, k * k, -1)
            out[:, :, y, x] = torch.einsum("bgt,bgtc->bgc", p, window)
    return out


def _bn(x, bn):
    s = (1, -1, 1, 1)
    return (x - bn.running_mean.view(s)) / torch.sqrt(bn.running_var.view(s) + bn.eps) * bn.weight.view(s) + \
        bn.bias.view(s)


def _conv_bn(seq, x):
    return _bn(torch.einsum("oc,bchw->bohw", seq[0].weight[:, :, 0, 0], x), seq[1])


def naive_contmix(m, query, key_src, values):
    b, c, h, w = query.shape
    g, s, k = m.groups, m.smk_size, m.kernel_size
    q = (_conv_bn(m.weight_query, query) * (c / g) ** -0.5).reshape(b, g, c // (2 * g), h * w)
    pooled = F.adaptive_avg_pool2d(key_src, 7)
    kk = _conv_bn(m.weight_key, pooled).reshape(b, g, c // (2 * g), 49)
    affinity = torch.einsum("bgcn,bgcl->bgnl", q, kk)
    logits = (affinity @ m.weight_proj.weight.T + m.weight_proj.bias).reshape(b, g, h, w, -1)
    v = values.reshape(b, 2, g, c // (2 * g), h, w).permute(1, 0, 2, 4, 5, 3)
    out1 = naive_aggregate(logits[..., :s * s], v[0], s, m.rpb1)
    out2 = naive_aggregate(logits[..., s * s:], v[1], k, m.rpb2)
    out = torch.stack([out1, out2]).permute(1, 0, 2, 5, 3, 4).reshape(b, c, h, w)
    return _conv_bn(m.dyconv_proj, out)


def _check_grads(out, ref, params):
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g, allow_unused=True),
                    torch.autograd.grad(ref, params, g, allow_unused=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,grid", [(3, (5, 6)), (5, (7, 9)), (7, (7, 8))])
def test_aggregate_matches_naive_windows(k, grid):
    torch.manual_seed(k)
    logits = torch.randn(2, 3, *grid, k * k, requires_grad=True)
    values = torch.randn(2, 3, *grid, 4, requires_grad=True)
    rpb = torch.randn(3, 2 * k - 1, 2 * k - 1, requires_grad=True)
    out, ref = contmix_aggregate(logits, values, k, rpb), naive_aggregate(logits, values, k, rpb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _check_grads(out, ref, [logits, values, rpb])


def test_contmix_matches_naive_forward_and_backward():
    torch.manual_seed(0)
    m = ContMix(16, 8, kernel_size=5, smk_size=3, num_heads=2).eval()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2)
    query = torch.randn(2, 16, 8, 9, requires_grad=True)
    key_src = torch.randn(2, 8, 8, 9, requires_grad=True)
    values = torch.randn(2, 16, 8, 9, requires_grad=True)
    out, ref = m(query, key_src, values), naive_contmix(m, query, key_src, values)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _check_grads(out, ref, [query, key_src, values, *m.parameters()])


def test_kernels_are_distributions():
    torch.manual_seed(1)
    # values of ones: every pixel's output is the sum of its tap weights
    logits = torch.randn(1, 2, 6, 6, 9)
    out = contmix_aggregate(logits, torch.ones(1, 2, 6, 6, 1), 3, torch.randn(2, 5, 5))
    torch.testing.assert_close(out, torch.ones_like(out))


def test_small_maps_are_resized_and_pooled_back():
    m = ContMixBlock(16, kernel_size=7).eval()
    for shape in [(1, 16, 4, 6), (1, 16, 9, 3)]:
        assert m(torch.randn(shape)).shape == shape


def test_parameter_counts_deploy_form():
    count = lambda m: sum(p.numel() for p in m.parameters())
    # the official counts less the dilated-reparam training branches, folded (72,940 and 95,228 before folding)
    assert count(ContMixBlock(64)) == 69_036
    assert count(ContMixBlock(64, kernel_size=13, ls_init_value=1)) == 84_796


def test_top_down_context_steers_the_block():
    torch.manual_seed(2)
    block = DynamicConvBlock(16, 8, kernel_size=5, smk_size=3, ls_init_value=1.0, res_scale=True).eval()
    x, h = torch.randn(2, 16, 8, 8), torch.randn(2, 8, 8, 8)
    out_a, out_b = block(x, h, torch.randn(2, 8, 8, 8)), block(x, h, torch.randn(2, 8, 8, 8))
    assert not torch.allclose(out_a[0], out_b[0], atol=1e-4)
    with torch.no_grad():
        block.h_scale.weight.zero_()
    out_a, out_b = block(x, h, torch.randn(2, 8, 8, 8)), block(x, h, torch.randn(2, 8, 8, 8))
    torch.testing.assert_close(out_a[0], out_b[0])
    last = DynamicConvBlock(16, 8, kernel_size=5, smk_size=3, is_first=True, is_last=True)
    merged, none = last(x, h, h)
    assert merged.shape == (2, 24, 8, 8) and none is None


def test_overlock_errors():
    with pytest.raises(ValueError, match="kernel_size"):
        ContMix(16, kernel_size=6)
    with pytest.raises(ValueError, match="dim"):
        ContMix(12, num_heads=2)
    with pytest.raises(ValueError, match="kernel_size"):
        contmix_aggregate(torch.randn(1, 1, 4, 4, 25), torch.randn(1, 1, 4, 4, 2), 5)
    with pytest.raises(ValueError, match="rpb"):
        contmix_aggregate(torch.randn(1, 1, 4, 4, 9), torch.randn(1, 1, 4, 4, 2), 3, torch.zeros(1, 3, 3))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        contmix_aggregate(None, torch.randn(1, 1, 4, 4, 2), 3)
    block = DynamicConvBlock(16, 8)
    with pytest.raises(ValueError, match=r"\[B, C=8, H, W\]"):
        block(torch.randn(1, 16, 8, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="H x W"):
        block(torch.randn(1, 16, 8, 8), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ContMixBlock(16)("x")
