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
from blockattn.ops import triton as triton_backend

ROOT = pathlib.Path(__file__).parents[2]
pytest.importorskip("triton")
CASES_PER_WORKER = 50


@pytest.mark.parametrize("first", [0, CASES_PER_WORKER, 2 * CASES_PER_WORKER])
def test_interpreted_kernel_matches_reference(first):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "tests.ops.triton_worker", str(first), str(CASES_PER_WORKER)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ok {CASES_PER_WORKER} fp32 cases" in result.stdout


@pytest.mark.parametrize("block_q, block_k, name, size", [(24, 32, "block_q", 24), (32, 8, "block_k", 8)])
def test_block_sizes_must_suit_tl_dot(monkeypatch, block_q, block_k, name, size):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layout = blockattn.patterns.causal(48, block_q=block_q, block_k=block_k)
    q = torch.randn(1, 1, 48, 16)
    with pytest.raises(ValueError, match=f"{name} to be a power of two >= 16, got {size}"):
        blockattn.attention(q, q, q, layout, backend="triton")


def test_float64_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layout = blockattn.patterns.causal(32, block_q=16, block_k=16)
    q = torch.randn(1, 1, 32, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"dtype float64 is not supported by the triton backend \(it runs float32, bfloat16, float16\)"):
        triton_backend.run(q, q, q, layout, scale=0.25)


def test_availability_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert triton_backend.available().startswith("unavailable: no CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "takes CUDA tensors" in triton_backend.available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.available(torch.device("cpu")) == "available"
