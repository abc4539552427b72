"""Moneta, Yaad, Memora: the named configurations, their public functions, and the MemoryMixer layer."""
import pytest
import torch

import blockattn.linear as linear
from blockattn.linear.miras import GradientDescent, HuberBias, KLRetention, L2Bias, L2Retention, LpBias, LqRetention
from blockattn.linear.miras.layer import MemoryMixer
from blockattn.linear.miras.memora import Memora
from blockattn.linear.miras.moneta import Moneta
from blockattn.linear.miras.yaad import Yaad
from blockattn.linear.miras import memory_naive
from blockattn.linear.miras.common import default_init
from tests.linear._util import rel_err


def test_configurations_follow_the_paper():
    from blockattn.linear.miras import MLPMemory, ResidualMLPMemory
    assert all(isinstance(c.parts.memory, ResidualMLPMemory) and c.parts.memory.expansion == 4
               for c in (Moneta(), Yaad(), Memora()))
    assert isinstance(Moneta(residual_norm=False).parts.memory, MLPMemory)
    moneta = Moneta().parts
    assert isinstance(moneta.bias, LpBias) and moneta.bias.p == 3 and isinstance(moneta.retention, LqRetention)
    assert moneta.retention.q == 4 and isinstance(moneta.rule, GradientDescent)
    assert isinstance(Yaad().parts.bias, HuberBias) and isinstance(Yaad().parts.retention, L2Retention)
    assert isinstance(Memora().parts.bias, L2Bias) and isinstance(Memora().parts.retention, KLRetention)


@pytest.mark.parametrize("name,config,extra", [("moneta", Moneta(), {}), ("yaad", Yaad(), {"delta": 0.7}),
                                               ("memora", Memora(), {})])
def test_public_functions_equal_the_token_loop(name, config, extra):
    q, k, v = (torch.nn.functional.normalize(torch.randn(1, 2, 16, 4), dim=-1) for _ in range(3))
    out = getattr(linear, name)(q, k, v, lr=0.2, decay=0.95, chunk_size=8, **extra)
    init = default_init(config.parts, 2, 4, 4)
    ref = memory_naive(q, k, v, parts=config.parts, lr=0.2, decay=0.95, init=init, chunk_size=8, **extra)
    assert out.shape == (1, 2, 16, 4) and rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("config", [Moneta(), Yaad(), Memora()], ids=lambda c: type(c).__name__)
def test_memory_mixer_is_causal_and_trainable(config):
    torch.manual_seed(0)
    mixer = MemoryMixer(8, config.parts, heads=2, chunk_size=4)
    x = torch.randn(2, 10, 8)  # 10 is not a multiple of 4: the layer pads at the end
    y = mixer(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    y2 = mixer(x2)
    assert y.shape == x.shape and torch.equal(y[:, :6], y2[:, :6]) and not torch.allclose(y[:, 6:], y2[:, 6:])
    y.square().mean().backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in mixer.parameters())


def test_memory_mixer_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by heads"):
        MemoryMixer(10, Moneta().parts, heads=3)


@pytest.mark.parametrize("name", ["moneta", "yaad", "memora", "titans"])
def test_non_causal_use_is_refused(name):
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="causal-only"):
        getattr(linear, name)(q, q, q, chunk_size=4, causal=False)


@pytest.mark.parametrize("config,extra", [(Moneta(), {}), (Yaad(), {"delta": 0.7}), (Memora(), {})],
                         ids=["moneta", "yaad", "memora"])
def test_decode_steps_continue_a_prefill(config, extra):
    from blockattn.linear.miras import memory_chunk, memory_step
    q, k, v = (torch.nn.functional.normalize(torch.randn(1, 2, 12, 4), dim=-1) for _ in range(3))
    init = default_init(config.parts, 2, 4, 4)
    kwargs = dict(parts=config.parts, lr=0.2, decay=0.95, init=init, chunk_size=4, **extra)
    full = memory_chunk(q, k, v, **kwargs)
    _, state = memory_chunk(q[:, :, :8], k[:, :, :8], v[:, :, :8], output_state=True, **kwargs)
    gate = lambda value: torch.full((2,), float(value))  # noqa: E731
    delta = gate(extra["delta"]) if extra else None
    steps = []
    for t in range(8, 12):
        y, state = memory_step(config.parts, state, q[0, :, t], k[0, :, t], v[0, :, t], gate(0.2), gate(0.95), None,
                               delta, 4)
        steps.append(y)
    assert rel_err(torch.stack(steps, dim=1).unsqueeze(0), full[:, :, 8:]) <= 1e-5


def _store_and_read(parts, lr, extra, seed, residual, length=256, dim=16):
    """`length` writes of one (k, v) pair (chunk 1: the sequential rule), then the read-out at q = k."""
    g = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(dim, generator=g, dtype=torch.float64), dim=-1)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    u = (u - u.mean()) / u.std(unbiased=False)  # a unit-scale value (entries of RMS 1)
    # the residual memory outputs k + (zero-mean, unit-RMS vector): store a target of that form
    v = k + u if residual else u
    keys, values = k.expand(1, 1, length, dim), v.expand(1, 1, length, dim)
    init = default_init(parts, 1, dim, dim, dtype=torch.float64, seed=seed)
    y = linear_memory(keys, keys, values, parts, lr, init, extra)
    return float((y[0, 0, -1] - v).norm() / v.norm())


def linear_memory(q, k, v, parts, lr, init, extra):
    from blockattn.linear.miras import memory_chunk
    return memory_chunk(q, k, v, parts=parts, lr=lr, decay=1.0, init=init, chunk_size=1, **extra)


@pytest.mark.parametrize("config,extra", [(Moneta(), {}), (Yaad(), {"delta": 1.0}), (Memora(), {}),
                                          (Moneta(residual_norm=False), {}), (Memora(residual_norm=False), {})],
                         ids=["moneta", "yaad", "memora", "moneta-bare", "memora-bare"])
def test_one_pair_store_and_read(config, extra):
    """With the paper's residual + LayerNorm memory every instance stores a unit-scale value and reads it
    back (relative error < 0.1); the bare MLP cannot, because the ℓ_q / simplex retention fixes its output
    scale (the test shows that by failing the bare variants the other way round)."""
    errors = [_store_and_read(config.parts, 0.01, extra, seed, config.residual_norm) for seed in range(3)]
    if config.residual_norm:
        assert max(errors) < 0.1, errors
    else:
        assert min(errors) > 0.5, errors
