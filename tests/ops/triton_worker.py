"""Runs the Triton exactness cases; executed by test_triton.py in a subprocess with TRITON_INTERPRET=1
(the interpreter must be chosen before triton is imported, and must not leak into other tests)."""
import re
import sys

import torch

from tests.ops.cases import check_backend, random_case
from tests.ops.conftest import _poisoning

# the same NaN poisoning as the in-process tests: an output row the kernel forgets to write fails
torch.empty = _poisoning(torch.empty)
torch.empty_like = _poisoning(torch.empty_like)
torch.Tensor.new_empty = _poisoning(torch.Tensor.new_empty)


def main(first: int, count: int) -> None:
    labels, packed_masks = [], 0
    for seed in range(first, first + count):
        case = random_case(seed, max_len=140, head_dims=(16, 32, 80), block_sizes=(16, 32))
        check_backend(case, "triton", fwd_tol=1e-5, grad_tol=1e-4)
        labels.append(case.label)
    for seed in range(first - first % 6 + 3, first - first % 6 + 3 + 6 * 3, 6):  # token_mask cases: two-word rows
        case = random_case(seed, max_len=140, head_dims=(16,), block_sizes=(64,))
        check_backend(case, "triton", fwd_tol=1e-5, grad_tol=1e-4)
        packed_masks += case.layout.tile_masks is not None
    assert packed_masks, "no case had explicit tile masks of 64 keys"
    for seed in range(4 if first == 0 else 0):
        dtype = (torch.bfloat16, torch.float16)[seed % 2]
        case = random_case(5000 + seed, dtype=dtype, max_len=100, head_dims=(16, 32), block_sizes=(16, 32))
        check_backend(case, "triton", fwd_tol=1e-2, grad_tol=2e-2, lse_tol=1e-2)
    # the random draw must have reached the features this backend has to get right
    def gqa(label):
        heads_q, heads_kv = map(int, re.search(r"-H(\d+)/(\d+)-", label).groups())
        return heads_q > heads_kv

    features = {"decode": lambda s: "-Lq1-" in s, "GQA": gqa, "different blocks": lambda s: "-bq16-bk32" in s,
                "token masks": lambda s: "token_mask" in s, "empty rows": lambda s: "empty_rows" in s,
                "window": lambda s: "window" in s, "per-head layout": lambda s: re.search(r"layout\dx[2-9]", s)}
    missing = [name for name, has in features.items() if not any(has(label) for label in labels)]
    assert not missing or count < 30, f"cases never exercised {missing}"
    print(f"ok {count} fp32 cases")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
