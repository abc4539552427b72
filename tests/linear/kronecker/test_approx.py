"""The bounded-entry polynomial approximation: within the error bound of the paper's argument, and converging."""
import math

import pytest
import torch

from blockattn.linear.kronecker import degree_for, entry_bound, error_bound, tensor_attention, tensor_attention_approx


def _bounded(shape, bound):
    return (2 * torch.rand(*shape, dtype=torch.float64) - 1) * bound


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bound", [0.5, 0.8, 1.0])
def test_error_within_bound(causal, bound):
    q, k1, k2 = (_bounded((1, 2, 24, 3), bound) for _ in range(3))
    v1, v2 = (_bounded((1, 2, 24, 2), 1.0) for _ in range(2))
    exact = tensor_attention(q, k1, v1, k2=k2, v2=v2, causal=causal)
    beta = entry_bound(q, k1, k2, 1 / 3)
    assert beta <= bound ** 3 + 1e-12
    value_bound = float(v1.abs().max() * v2.abs().max())
    errors = []
    for degree in range(1, 8):
        approx = tensor_attention_approx(q, k1, v1, k2=k2, v2=v2, degree=degree, causal=causal)
        err = float((approx - exact).abs().max())
        assert err <= error_bound(beta, degree, value_bound) + 1e-12, degree
        errors.append(err)
    assert errors[-1] < errors[0] and errors[-1] < 1e-5


def test_auto_degree_reaches_eps():
    q, k, v = (_bounded((1, 1, 32, 4), 0.9) for _ in range(3))
    beta = entry_bound(q, k, k, 1 / 4)
    degree = degree_for(beta, 1e-4)
    assert error_bound(beta, degree) <= 1e-4 and (degree == 0 or error_bound(beta, degree - 1) > 1e-4)
    approx = tensor_attention_approx(q, k, v, eps=1e-4)
    assert float((approx - tensor_attention(q, k, v)).abs().max()) <= 1e-4


def test_error_bound_formula():
    beta, degree = 0.7, 3
    eps = math.exp(2 * beta) * beta ** 4 / math.factorial(4)
    assert error_bound(beta, degree, 2.0) == pytest.approx(2 * eps / (1 - eps) * 2.0)
    assert error_bound(3.0, 1) == math.inf
    assert error_bound(500.0, 3) == math.inf and error_bound(0.0, 2) == 0.0  # no overflow, no log(0)


def test_large_entries_and_bad_degree_raise():
    q, k, v = (torch.randn(1, 1, 8, 4) * 3 for _ in range(3))
    with pytest.raises(ValueError, match="entries are too large"):
        tensor_attention_approx(q, k, v)
    with pytest.raises(ValueError, match="degree must be"):
        tensor_attention_approx(q, k, v, degree=-1)
    with pytest.raises(ValueError, match="rank"):
        tensor_attention_approx(torch.rand(1, 1, 4, 16), torch.rand(1, 1, 4, 16), torch.rand(1, 1, 4, 16), degree=5)
