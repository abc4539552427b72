"""Runs the Triton exactness cases; executed by test_triton.py in a subprocess with TRITON_INTERPRET=1
(the interpreter must be chosen before triton is imported, and must not leak into other tests)."""
import sys

import torch

from tests.ops.cases import check_backend, random_case


def main(first: int, count: int) -> None:
    for seed in range(first, first + count):
        case = random_case(seed, max_len=150, head_dims=(16, 32, 80), block_sizes=(16, 32))
        check_backend(case, "triton", fwd_tol=1e-5, grad_tol=1e-4)
    for seed in range(6 if first == 0 else 0):
        dtype = (torch.bfloat16, torch.float16)[seed % 2]
        case = random_case(5000 + seed, dtype=dtype, max_len=100, head_dims=(16, 32), block_sizes=(16, 32))
        check_backend(case, "triton", fwd_tol=1e-2, grad_tol=2e-2, lse_tol=1e-2)
    print(f"ok {count} fp32 cases")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
