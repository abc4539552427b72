"""Titans' chunked-parallel memory equals its token loop (forward, gradients) and decode continues a prefill exactly."""
import pytest
import torch

from blockattn.linear.titans import titans, titans_naive, titans_step
from tests.linear._util import rel_err


def _inputs(batch=2, heads=2, length=16, d_k=4, d_v=5):
    q, k = (torch.nn.functional.normalize(torch.randn(batch, heads, length, d_k), dim=-1) for _ in range(2))
    v = torch.randn(batch, heads, length, d_v)
    lr = 0.1 * torch.rand(batch, heads, length)  # small steps: the MLP memory must not diverge on random data
    momentum = 0.1 + 0.8 * torch.rand(batch, heads, length)
    forget = 0.2 * torch.rand(batch, heads, length)
    return q, k, v, lr, momentum, forget


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunk_equals_token_loop(chunk_size):
    tensors = _inputs()
    init = 0.3 * torch.randn(2, 2 * 4 * 4 + 5 * 8)
    probe = torch.randn(2, 2, 16, 5)
    results = []
    for fn in (titans_naive, titans):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, init)]
        q, k, v, lr, momentum, forget, w0 = leaves
        out = fn(q, k, v, lr=lr, momentum=momentum, forget=forget, init=w0, chunk_size=chunk_size)
        (out * probe).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    assert rel_err(results[1][0], results[0][0]) <= 1e-4
    for name, fast, ref in zip(["q", "k", "v", "lr", "momentum", "forget", "init"], results[1][1], results[0][1]):
        assert rel_err(fast, ref) <= 1e-4, name


def test_residual_norm_memory_chunk_equals_token_loop():
    q, k, v, lr, momentum, forget = _inputs(d_v=4)
    kwargs = dict(lr=lr, momentum=momentum, forget=forget, chunk_size=4, residual_norm=True, expansion=4)
    fast, ref = titans(q, k, v, **kwargs), titans_naive(q, k, v, **kwargs)
    assert rel_err(fast, ref) <= 1e-4 and not torch.allclose(fast, titans(q, k, v, **{**kwargs, "residual_norm": False}))


def test_decode_continues_prefill():
    q, k, v, lr, momentum, forget = _inputs(length=24)
    gates = lambda s: dict(lr=lr[:, :, s], momentum=momentum[:, :, s], forget=forget[:, :, s])  # noqa: E731
    full = titans(q, k, v, chunk_size=8, **gates(slice(None)))
    _, state = titans(q[:, :, :16], k[:, :, :16], v[:, :, :16], chunk_size=8, output_state=True, **gates(slice(0, 16)))
    steps = []
    for t in range(16, 24):
        y, state = titans_step(q[:, :, t], k[:, :, t], v[:, :, t], state, chunk_size=8, **gates(t))
        steps.append(y)
    assert rel_err(torch.stack(steps, dim=2), full[:, :, 16:]) <= 1e-5
    # and a chunked call can pick up where the steps left off (they ended on a chunk boundary)
    assert state.position == 24


def test_bad_inputs():
    q, k, v, *_ = _inputs(length=12)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        titans(q, k, v, chunk_size=8)
    with pytest.raises(ValueError, match="forget must lie in"):
        titans(q, k, v, chunk_size=4, forget=1.0)
    with pytest.raises(ValueError, match="feature dims must match"):
        titans(q, k[..., :2], v, chunk_size=4)
    with pytest.raises(ValueError, match="momentum must lie in"):
        titans(q, k, v, chunk_size=4, momentum=1.0)
    with pytest.raises(TypeError, match="state must be the MemoryState"):
        titans_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], None)
    _, state = titans(q[:, :, :4], k[:, :, :4], v[:, :, :4], chunk_size=4, output_state=True)
    _, state = titans_step(q[:, :, 4], k[:, :, 4], v[:, :, 4], state, chunk_size=4)
    with pytest.raises(ValueError, match="chunk boundary"):
        titans(q[:, :, 5:9], k[:, :, 5:9], v[:, :, 5:9], chunk_size=4, initial_state=state)
