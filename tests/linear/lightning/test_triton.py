"""The Triton Lightning kernel on the CPU interpreter, in a subprocess so TRITON_INTERPRET does not leak."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from blockattn.linear import lightning_attention

ROOT = pathlib.Path(__file__).parents[3]
pytest.importorskip("triton")


def test_interpreted_kernel_matches_naive():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "tests.linear.lightning.triton_worker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok triton lightning" in result.stdout


def test_kernel_dims_must_suit_tl_dot():
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="Dk to be a power of two >= 16, got 8"):
        lightning_attention(q, q, q, torch.ones(1), backend="triton")


def test_bad_backend():
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="backend must be"):
        lightning_attention(q, q, q, torch.ones(1), backend="cuda")
