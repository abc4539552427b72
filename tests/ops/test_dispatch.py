"""Backends choose by capability: each says whether it can run a call, `auto` takes the first that can."""
import pytest
import torch

import blockattn
from blockattn.ops import dispatch


def _inputs(dtype=torch.float32, block=32):
    layout = blockattn.patterns.causal(96, block_q=block, block_k=block)
    q, k, v = (torch.randn(1, 2, 96, 16, dtype=dtype) for _ in range(3))
    return q, k, v, layout


def test_every_backend_answers_can_run():
    for name in dispatch.names():
        answer = dispatch.can_run(name, *_inputs())
        assert answer == "available" or answer.startswith(("unavailable", "dtype", "the ")), (name, answer)


def test_auto_on_cpu_takes_the_compiled_kernel_and_float64_goes_to_torch():
    if blockattn.backends()["cpu"] != "available":
        pytest.skip("cpu kernel not built")
    assert dispatch.choose_for(*_inputs()) == "cpu"
    assert dispatch.choose_for(*_inputs(torch.float64)) == "torch"


def test_auto_falls_through_a_backend_that_cannot_run_the_call(monkeypatch):
    # as on CUDA: Triton first; float64 and a 48-token block are not Triton's, so the next backend runs them
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(dispatch._AUTO_ORDER, "cpu", ("triton", "torch"))
    assert dispatch.choose_for(*_inputs()) == "triton"
    assert dispatch.choose_for(*_inputs(torch.float64)) == "torch"
    assert dispatch.choose_for(*_inputs(block=48)) == "torch"
    q, k, v, layout = _inputs(block=48)
    expected = blockattn.attention(q, k, v, layout, backend="reference")
    assert torch.allclose(blockattn.attention(q, k, v, layout), expected, atol=1e-5)


def test_a_backend_that_cannot_run_the_call_names_the_reason_and_the_backends_that_can(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, layout = _inputs(torch.float64)
    with pytest.raises(TypeError, match=r"dtype float64 is not supported by the triton backend .*backends that can"):
        blockattn.attention(q, k, v, layout, backend="triton")
    q, k, v, layout = _inputs(block=48)
    with pytest.raises(ValueError, match=r"block_q to be a power of two >= 16, got 48"):
        blockattn.attention(q, k, v, layout, backend="triton")


def test_the_environment_switch_is_checked(monkeypatch):
    monkeypatch.setenv("BLOCKATTN_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="BLOCKATTN_BACKEND='cuda-magic' is not a backend"):
        dispatch.choose_for(*_inputs())
    monkeypatch.setenv("BLOCKATTN_BACKEND", "torch")
    assert dispatch.choose_for(*_inputs()) == "torch"
