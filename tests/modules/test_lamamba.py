"""LaMamba-Diff block: the chunked selective scan against the step-by-step recurrence, SS2D and the
whole block against their equations written out (Swin-masked dense window attention), fwd and bwd."""
import pytest
import torch
import torch.nn.functional as F

from blockattn.modules import SS2D, LaMambaBlock, WindowAttention, selective_scan
from tests.modules.oracle import dense_module_output
from tests.patterns.test_windows import _swin_mask


def naive_scan(x, delta, A, B, C, D):
    bt, length, dm = x.shape
    h = torch.zeros(bt, dm, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(ys, 1)


def _grads(out, ref, params):
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,chunk,n", [(23, 8, 1), (16, 16, 3), (10, 32, 2)])
def test_selective_scan_matches_recurrence(length, chunk, n):
    torch.manual_seed(length)
    x = torch.randn(2, length, 5, requires_grad=True)
    delta = F.softplus(torch.randn(2, length, 5)).requires_grad_()
    A = (-torch.rand(5, n) - 0.1).requires_grad_()
    B, C = torch.randn(2, length, n, requires_grad=True), torch.randn(2, length, n, requires_grad=True)
    D = torch.randn(5, requires_grad=True)
    out, ref = selective_scan(x, delta, A, B, C, D, chunk=chunk), naive_scan(x, delta, A, B, C, D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _grads(out, ref, [x, delta, A, B, C, D])


def naive_ss2d(m, x):
    b, h, w, _ = x.shape
    u, z = (x @ m.in_proj.weight.T).chunk(2, -1)
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), m.conv.weight, padding=1, groups=m.d_inner)).permute(0, 2, 3, 1)
    total = torch.zeros(b, h, w, m.d_inner)
    for i in range(4):
        # order i visits (r, c) row by row or column by column, forwards or backwards
        coords = [(r, c) for r in range(h) for c in range(w)] if i % 2 == 0 else \
                 [(r, c) for c in range(w) for r in range(h)]
        coords = coords[::-1] if i >= 2 else coords
        seq = torch.stack([u[:, r, c] for r, c in coords], 1)
        proj = seq @ m.x_proj_weight[i].T
        dt, B, C = proj[..., :m.dt_rank], proj[..., m.dt_rank:m.dt_rank + m.d_state], proj[..., m.dt_rank + m.d_state:]
        delta = F.softplus(dt @ m.dt_proj_weight[i].T + m.dt_proj_bias[i])
        y = naive_scan(seq, delta, -torch.exp(m.A_log[i]), B, C, m.D[i])
        total = total + torch.stack([torch.stack([y[:, coords.index((r, c))] for c in range(w)], 1)
                                     for r in range(h)], 1)
    return m.out_proj(F.layer_norm(total, (m.d_inner,), m.out_norm.weight, m.out_norm.bias, m.out_norm.eps) *
                      F.silu(z))


def test_ss2d_matches_naive():
    torch.manual_seed(0)
    m = SS2D(8, d_state=2, chunk=5)
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    out, ref = m(x), naive_ss2d(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _grads(out, ref, [x, *m.parameters()])


@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_is_swin(shift):
    torch.manual_seed(1)
    m = WindowAttention(8, 2, window=4, shift=shift, backend="torch").double()
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    mask = _swin_mask((8, 8), (4, 4), (shift, shift))
    torch.testing.assert_close(m(x), dense_module_output(m, x, mask[None]), rtol=1e-10, atol=1e-10)


def test_block_matches_naive_and_starts_as_identity():
    torch.manual_seed(2)
    m = LaMambaBlock(8, 2, cond_dim=6, window=4, shift=2)
    x, c = torch.randn(2, 8, 8, 8, requires_grad=True), torch.randn(2, 6, requires_grad=True)
    torch.testing.assert_close(m(x, c), x)
    with torch.no_grad():
        torch.nn.init.normal_(m.ada[1].weight, std=0.3)
        torch.nn.init.normal_(m.ada[1].bias, std=0.3)
    mods = (F.silu(c) @ m.ada[1].weight.T + m.ada[1].bias).chunk(9, -1)
    mask = _swin_mask((8, 8), (4, 4), (2, 2))[None]
    ref = x
    for i, layer in enumerate([lambda z: naive_ss2d(m.ssm, z), lambda z: dense_module_output(m.attn, z, mask),
                               m.mlp]):
        shift, scale, gate = (t[:, None, None] for t in mods[3 * i:3 * i + 3])
        normed = F.layer_norm(ref, (8,), eps=1e-6)
        ref = ref + gate * layer(normed * (1 + scale) + shift)
    out = m(x, c)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _grads(out, ref, [x, c, *m.parameters()])


def test_windows_do_not_mix_without_shift():
    torch.manual_seed(3)
    m = WindowAttention(8, 2, window=4)
    x = torch.randn(1, 8, 8, 8)
    y = x.clone()
    y[:, 6, 6] += 1.0
    torch.testing.assert_close(m(x)[:, :4, :4], m(y)[:, :4, :4])
    # (3, 3) and (4, 4) sit in different regular windows but in one shifted window ([2, 6) on both axes)
    z = x.clone()
    z[:, 4, 4] += 1.0
    torch.testing.assert_close(m(x)[:, 3, 3], m(z)[:, 3, 3])
    shifted = WindowAttention(8, 2, window=4, shift=2)
    shifted.load_state_dict(m.state_dict())
    assert not torch.allclose(shifted(x)[:, 3, 3], shifted(z)[:, 3, 3])


def test_lamamba_errors():
    with pytest.raises(ValueError, match="shift"):
        WindowAttention(8, 2, window=4, shift=4)
    m = LaMambaBlock(8, 2)
    with pytest.raises(ValueError, match=r"\[B=1, cond_dim=8\]"):
        m(torch.randn(1, 4, 4, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\[B, H, W, C=8\]"):
        m(torch.randn(1, 8, 4, 4), torch.randn(1, 8))
    with pytest.raises(ValueError, match="window"):
        m(torch.randn(1, 12, 12, 8), torch.randn(1, 8))
