"""The token loop against hand-written recurrences in float64 (independent of autograd and of the memories' `grad_factors`)."""
import torch

from blockattn.linear.miras import (GradientDescent, KLRetention, L2Bias, L2Retention, LinearMemory, LqRetention,
                                    MirasParts, MLPMemory, MomentumDescent, memory_naive, memory_step)
from blockattn.linear.miras.common import initial_state


def test_linear_memory_is_the_delta_rule_with_momentum():
    batch, heads, length, d_k, d_v = 1, 2, 10, 3, 2
    q, k = (torch.randn(batch, heads, length, d_k, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch, heads, length, d_v, dtype=torch.float64)
    lr, decay, mom = (torch.rand(batch, heads, length, dtype=torch.float64) * 0.5 + 0.1 for _ in range(3))
    init = torch.randn(heads, d_v * d_k, dtype=torch.float64)
    parts = MirasParts(LinearMemory(), L2Bias(), L2Retention(), MomentumDescent())
    out = memory_naive(q, k, v, parts=parts, lr=lr, decay=decay, momentum=mom, init=init, chunk_size=1)
    for h in range(heads):
        w, s = init[h].view(d_v, d_k).clone(), torch.zeros(d_v, d_k, dtype=torch.float64)
        for t in range(length):
            grad = 2 * torch.outer(w @ k[0, h, t] - v[0, h, t], k[0, h, t])
            s = mom[0, h, t] * s - lr[0, h, t] * grad
            w = decay[0, h, t] * w + s
            assert torch.allclose(out[0, h, t], w @ q[0, h, t], rtol=1e-10, atol=1e-10)


def test_mlp_gradient_is_taken_at_the_chunk_start():
    batch, heads, length, d = 1, 1, 8, 3
    q, k, v = (torch.randn(batch, heads, length, d, dtype=torch.float64) for _ in range(3))
    parts = MirasParts(MLPMemory(2), L2Bias(), L2Retention(), GradientDescent())
    init = 0.5 * torch.randn(heads, 2 * d * d + d * 2 * d, dtype=torch.float64)
    out = memory_naive(q, k, v, parts=parts, lr=0.3, decay=0.9, init=init, chunk_size=4)
    w1, w2 = init[0, :2 * d * d].view(2 * d, d), init[0, 2 * d * d:].view(d, 2 * d)
    ref1, ref2 = w1, w2
    for t in range(length):
        if t % 4 == 0:
            ref1, ref2 = w1.clone(), w2.clone()
        pre = ref1 @ k[0, 0, t]
        hid = pre * torch.sigmoid(pre)
        err = 2 * (ref2 @ hid - v[0, 0, t])
        dpre = (ref2.T @ err) * torch.sigmoid(pre) * (1 + pre * (1 - torch.sigmoid(pre)))
        w1 = 0.9 * w1 - 0.3 * torch.outer(dpre, k[0, 0, t])
        w2 = 0.9 * w2 - 0.3 * torch.outer(err, hid)
        pre_q = w1 @ q[0, 0, t]
        assert torch.allclose(out[0, 0, t], w2 @ (pre_q * torch.sigmoid(pre_q)), rtol=1e-10, atol=1e-10)


def test_retention_maps():
    accum = torch.randn(5, 12)
    shapes = [(3, 4)]
    memora = KLRetention().weights(accum, shapes).view(5, 3, 4)
    assert torch.allclose(memora.sum(-1), torch.ones(5, 3)) and bool((memora > 0).all())
    moneta = LqRetention(4.0).weights(accum, shapes)
    assert torch.allclose(moneta, accum / accum.norm(p=4, dim=-1, keepdim=True) ** 2)


def test_step_without_autograd_returns_detached_state():
    parts = MirasParts()
    init = torch.randn(1, 2 * 4 * 4 + 4 * 8)
    state = initial_state(parts, init, 1, 1)
    with torch.no_grad():
        y, state = memory_step(parts, state, *(torch.randn(1, 4) for _ in range(3)), torch.tensor([0.1]),
                               torch.tensor([0.9]), torch.tensor([0.5]), None, 4)
    assert y.shape == (1, 4) and not y.requires_grad and state.position == 1 and not state.accum.requires_grad
