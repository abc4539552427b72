"""The Triton kernel against the float64 reference, on the CPU through Triton's interpreter.

The interpreter must be chosen before triton is imported, so the cases run in a subprocess
(tests/ops/triton_worker.py) with TRITON_INTERPRET=1; nothing leaks into the other tests."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import blockattn

ROOT = pathlib.Path(__file__).parents[2]
pytest.importorskip("triton")


@pytest.mark.parametrize("first", [0, 70, 140])
def test_interpreted_kernel_matches_reference(first):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "tests.ops.triton_worker", str(first), "70"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok 70 fp32 cases" in result.stdout


def test_block_sizes_must_suit_tl_dot(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layout = blockattn.patterns.causal(48, block_q=24, block_k=24)
    q = torch.randn(1, 1, 48, 16)
    with pytest.raises(ValueError, match="block_q to be a power of two >= 16, got 24"):
        blockattn.attention(q, q, q, layout, backend="triton")
