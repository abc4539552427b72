"""The compiled CPU kernel against the float64 reference on random layouts (forward, lse, gradients)."""
import pytest
import torch

import blockattn
from tests.ops.cases import check_backend, random_case

pytestmark = pytest.mark.skipif(blockattn.backends()["cpu"] != "available",
                                reason=f"cpu kernel not built: {blockattn.backends()['cpu']}")


@pytest.mark.parametrize("seed", range(220))
def test_matches_reference_fp32(seed):
    check_backend(random_case(seed), "cpu", fwd_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_half(seed, dtype):
    check_backend(random_case(2000 + seed, dtype=dtype), "cpu", fwd_tol=1e-2, grad_tol=2e-2, lse_tol=1e-2)


@pytest.mark.parametrize("dim", [80, 128, 256])
def test_large_head_dims_and_custom_scale(dim):
    check_backend(random_case(11, head_dims=(dim,)), "cpu", fwd_tol=1e-5, grad_tol=1e-4, scale=0.2)


def test_float64_inputs_are_exact():
    check_backend(random_case(5, dtype=torch.float64), "cpu", fwd_tol=1e-12, grad_tol=1e-12)


def test_long_rows_span_many_tiles():
    # 1024 keys in 16 tiles per row: exercises the online-softmax rescaling across tiles
    q, k, v = (torch.randn(1, 2, 1024, 64) * 3 for _ in range(3))
    from tests.ops.cases import Case
    layout = blockattn.patterns.random_blocks(1024, density=0.5, heads=2, seed=4)
    check_backend(Case(q, k, v, layout, "long"), "cpu", fwd_tol=1e-5, grad_tol=1e-4)
