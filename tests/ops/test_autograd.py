"""lse is differentiable: two attention calls over disjoint key sets merge, through their lse, into one
exact softmax over the union, forward and backward, on every backend that runs here."""
import pytest
import torch

import blockattn
from blockattn import BlockLayout


def _split_layouts(q_len, k_len, block, seed):
    g = torch.Generator().manual_seed(seed)
    n_q, n_k = -(-q_len // block), -(-k_len // block)
    union = torch.rand(1, 2, n_q, n_k, generator=g) < 0.7
    union[..., 0] = True
    union[..., -1] = True
    first = union & (torch.rand(union.shape, generator=g) < 0.5)
    first[..., 0], first[..., -1] = True, False
    second = union & ~first
    common = dict(q_len=q_len, k_len=k_len, block_q=block, block_k=block, allow_empty_rows=True)
    return (BlockLayout.from_dense(first, **common), BlockLayout.from_dense(second, **common),
            BlockLayout.from_dense(union, **common))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("seed", range(3))
def test_two_calls_merged_by_lse_equal_one_call_over_the_union(backend, seed):
    if blockattn.backends()[backend] != "available":
        pytest.skip(blockattn.backends()[backend])
    first, second, union = _split_layouts(150, 170, 32, seed)
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(100 + seed)
    q, k, v = (torch.randn(2, h, n, 32, generator=g, dtype=torch.float64)
               for h, n in ((2, 150), (1, 170), (1, 170)))
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out_a, lse_a = blockattn.attention(*leaves, first, return_lse=True, backend=backend)
    out_b, lse_b = blockattn.attention(*leaves, second, return_lse=True, backend=backend)
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).unsqueeze(-1).to(dtype)
    weight_b = torch.exp(lse_b - lse).unsqueeze(-1).to(dtype)
    merged = weight_a * out_a + weight_b * out_b
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected, expected_lse = blockattn.attention(*leaves64, union, return_lse=True, backend="reference")
    tol = 2e-5  # lse is float32 by contract, whatever the input dtype
    assert torch.allclose(merged.double(), expected, atol=tol, rtol=tol)
    assert torch.allclose(lse.double(), expected_lse.double(), atol=tol, rtol=tol)
    grad = torch.randn(merged.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(merged, leaves, grad.to(dtype))
    want = torch.autograd.grad(expected, leaves64, grad)
    for name, a, b in zip("qkv", got, want):
        assert torch.allclose(a.double(), b, atol=20 * tol, rtol=20 * tol), f"d{name}"


def test_lse_gradient_alone_is_the_softmax_weighted_query_gradient():
    # d(sum lse)/dq = scale * sum_j p_ij k_j: checked against torch's own autograd of logsumexp
    layout = blockattn.patterns.causal(64, block_q=16, block_k=16)
    q, k, v = (torch.randn(1, 1, 64, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _, lse = blockattn.attention(q, k, v, layout, return_lse=True, backend="torch")
    (dq,) = torch.autograd.grad(lse.sum(), q)
    scores = (q @ k.transpose(-1, -2)) * 16 ** -0.5
    scores = scores.masked_fill(~layout.to_token_mask(), float("-inf"))
    (want,) = torch.autograd.grad(torch.logsumexp(scores, -1).sum(), q)
    assert torch.allclose(dq, want, atol=1e-12)
