"""RAT decode steps continue a chunk-parallel prefill exactly."""
import pytest
import torch

from blockattn.linear import rat, rat_step
from blockattn.linear.rat import RATCache
from tests.linear._util import rel_err


def test_steps_continue_prefill():
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    f = torch.sigmoid(torch.randn(1, 2, 40, 8))
    whole = rat(q, k, v, f, chunk_size=8)
    out, cache = rat(q[:, :, :16], k[:, :, :16], v[:, :, :16], f[:, :, :16], chunk_size=8, output_cache=True)
    outs = [out]
    for t in range(16, 40):
        y, cache = rat_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], f[:, :, t:t + 1], cache, chunk_size=8)
        outs.append(y)
    assert cache.summaries_k.shape[2] == 5
    assert rel_err(torch.cat(outs, dim=2), whole) <= 1e-5


def test_steps_from_empty_cache():
    q, k, v = (torch.randn(1, 1, 12, 4) for _ in range(3))
    f = torch.sigmoid(torch.randn(1, 1, 12, 4))
    cache = RATCache.empty(1, 1, 4)
    outs = []
    for t in range(12):
        y, cache = rat_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], f[:, :, t:t + 1], cache, chunk_size=4)
        outs.append(y)
    assert rel_err(torch.cat(outs, dim=2), rat(q, k, v, f, chunk_size=4)) <= 1e-5


def test_step_bad_cache():
    q = torch.randn(1, 1, 1, 4)
    with pytest.raises(TypeError, match="cache must be a RATCache"):
        rat_step(q, q, q, q, cache=None)


def test_steps_continue_prefill_with_chunk_rope():
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    f = torch.rand(1, 2, 12, 8, dtype=torch.float64)
    full = rat(q, k, v, f, chunk_size=4, chunk_rope=True)
    _, cache = rat(q[:, :, :4], k[:, :, :4], v[:, :, :4], f[:, :, :4], chunk_size=4, chunk_rope=True,
                   output_cache=True)
    steps = []
    for t in range(4, 12):
        y, cache = rat_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], f[:, :, t:t + 1], cache,
                            chunk_size=4, chunk_rope=True)
        steps.append(y)
    assert torch.allclose(torch.cat(steps, dim=2), full[:, :, 4:], atol=1e-12)
