"""blockattn.attention at the boundary: every bad input gets a typed error naming the argument."""
import pytest
import torch

import blockattn
from blockattn import patterns


def _inputs(B=1, Hq=4, Hkv=2, Lq=32, Lk=32, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype),
            torch.randn(B, Hkv, Lk, D, dtype=dtype))


LAYOUT = patterns.causal(32, block_q=16, block_k=16)


@pytest.mark.parametrize("change,error,message", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of key/value heads"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "q must be float32"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "k must share q's dtype"),
    (lambda q, k, v: (q, k[:, :, :20], v[:, :, :20]), ValueError, "layout was built for"),
    (lambda q, k, v: (torch.cat([q, q]), k, v), ValueError, "same batch size"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
])
def test_bad_tensors_are_rejected(change, error, message):
    q, k, v = change(*_inputs())
    with pytest.raises(error, match=message):
        blockattn.attention(q, k, v, LAYOUT)


def test_head_dim_limit_and_mismatch():
    q, k, v = _inputs(D=264)
    with pytest.raises(ValueError, match="head dim must be <= 256"):
        blockattn.attention(q, k, v, LAYOUT)
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="same head dim"):
        blockattn.attention(q[..., :8], k, v, LAYOUT)


def test_layout_that_does_not_broadcast():
    q, k, v = _inputs()
    layout = patterns.random_blocks(32, density=0.5, heads=3, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="does not broadcast to 4 query heads"):
        blockattn.attention(q, k, v, layout)
    with pytest.raises(TypeError, match="layout must be a BlockLayout"):
        blockattn.attention(q, k, v, "causal")


def test_unknown_backend_and_wrong_device():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        blockattn.attention(q, k, v, LAYOUT, backend="cuda")
    # a tensor on another device than the backend's: 'meta' stands in for CUDA on this machine
    q, k, v = (t.to("meta") for t in _inputs())
    with pytest.raises(ValueError, match="backend 'cpu' cannot run this call: unavailable on meta"):
        blockattn.attention(q, k, v, LAYOUT, backend="cpu")


def test_backends_reports_every_backend_with_a_reason():
    status = blockattn.backends()
    assert set(status) == {"reference", "torch", "cpu", "triton", "flex"}
    assert status["reference"] == status["torch"] == "available"
    assert all(s == "available" or s.startswith("unavailable") for s in status.values())


def test_auto_backend_matches_reference_and_env_switch(monkeypatch):
    from blockattn.ops.reference import reference_attention
    q, k, v = _inputs()
    expected = reference_attention(q.double(), k.double(), v.double(), LAYOUT)
    for forced in (None, "torch"):
        if forced:
            monkeypatch.setenv("BLOCKATTN_BACKEND", forced)
        out = blockattn.attention(q, k, v, LAYOUT)
        assert torch.allclose(out.double(), expected, atol=1e-5)
    monkeypatch.setenv("BLOCKATTN_BACKEND", "gpu")
    with pytest.raises(ValueError, match="BLOCKATTN_BACKEND"):
        blockattn.attention(q, k, v, LAYOUT)


def test_sparse_attention_rejects_unknown_method():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods"):
        blockattn.sparse_attention(q, k, v, "nope")


def test_sparse_attention_passes_context_to_select():
    from blockattn.ops.reference import reference_attention
    q, k, v = (torch.randn(1, 2, 4 * 8 * 8, 16) for _ in range(3))
    grid = (4, 8, 8)
    out = blockattn.sparse_attention(q, k, v, "vmoba", context={"grid": grid})
    layout = blockattn.methods.get("vmoba").select(q, k, grid=grid)
    assert torch.allclose(out.double(), reference_attention(q.double(), k.double(), v.double(), layout), atol=1e-5)
