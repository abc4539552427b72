"""The portable PyTorch backend against the float64 reference on random layouts."""
import pytest
import torch

from tests.ops.cases import check_backend, random_case


@pytest.mark.parametrize("seed", range(210))
def test_matches_reference_fp32(seed):
    check_backend(random_case(seed), "torch", fwd_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_half(seed, dtype):
    check_backend(random_case(1000 + seed, dtype=dtype), "torch", fwd_tol=1e-2, grad_tol=2e-2, lse_tol=1e-2)


def test_custom_scale_and_large_head_dim():
    case = random_case(7, head_dims=(256,))
    check_backend(case, "torch", fwd_tol=1e-5, grad_tol=1e-4, scale=0.3)
