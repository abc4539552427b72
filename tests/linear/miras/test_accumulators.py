"""The implicit per-token accumulators (the fast chunked path) against the step-by-step recurrence, in float64.

Fresh random inputs every run (no fixed seed), forward and backward: the read-outs against explicitly
built per-token matrices, the hand-written backwards by gradcheck, and Moneta / Memora / Yaad / Titans
through `memory_chunk` against the token loop over several chunks at the MQAR layer's chunk size."""
import pytest
import torch

from blockattn.linear.miras import memory_chunk, memory_naive
from blockattn.linear.miras.accumulators import ChunkAccumulators
from blockattn.linear.miras.common import param_count
from blockattn.linear.miras.memora import Memora
from blockattn.linear.miras.moneta import Moneta
from blockattn.linear.miras.yaad import Yaad
from blockattn.linear.titans.naive import Titans
from tests.linear._util import rel_err

F64 = dict(dtype=torch.float64)


def _chunk_inputs(n=2, c=5, rows=4, cols=3, bases=2):
    coefs = torch.rand(n, c, bases, **F64)
    base = torch.randn(bases, n, rows * cols, **F64)
    mix = torch.randn(n, c, c, **F64).tril()
    a, b, h = torch.randn(n, c, rows, **F64), torch.randn(n, c, cols, **F64), torch.randn(n, c, cols, **F64)
    return [coefs, base, mix, a, b, h]


def _explicit(coefs, base, mix, a, b, rows, cols):
    """A_t token by token: Σ_j coefs[t, j] base_j + Σ_{r≤t} mix[t, r] a_r b_rᵀ, written as a plain loop."""
    out = []
    for t in range(mix.shape[1]):
        acc = sum(coefs[:, t, j, None, None] * base[j].view(-1, rows, cols) for j in range(base.shape[0]))
        for r in range(t + 1):
            acc = acc + mix[:, t, r, None, None] * a[:, r, :, None] * b[:, r, None, :]
        out.append(acc)
    return torch.stack(out, dim=1)


def _fast(name, coefs, base, mix, a, b, h, rows, cols):
    chunk = ChunkAccumulators([(rows, cols)], coefs, list(base), mix, [(a, b)])
    if name == "matvec":
        return chunk.matvec(0, h)
    if name == "softmax":
        return chunk.softmax_matvec(0, h)
    return chunk.power_sums(0, {"power4": 4.0, "power3": 3.0}[name])


def _slow(name, coefs, base, mix, a, b, h, rows, cols):
    mats = _explicit(coefs, base, mix, a, b, rows, cols)
    if name == "matvec":
        return (mats @ h.unsqueeze(-1)).squeeze(-1)
    if name == "softmax":
        return (torch.softmax(mats, dim=-1) @ h.unsqueeze(-1)).squeeze(-1)
    return (mats.abs() ** {"power4": 4.0, "power3": 3.0}[name]).sum((-1, -2))


@pytest.mark.parametrize("name", ["matvec", "softmax", "power4", "power3"])
def test_read_outs_equal_explicit_per_token_matrices(name):
    rows, cols = 4, 3
    tensors = _chunk_inputs(rows=rows, cols=cols)
    results = []
    for fn in (_slow, _fast):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = fn(name, *leaves, rows, cols)
        probe = torch.randn_like(out) if not results else results[0][2]
        (out * probe).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves], probe))
    (ref, ref_grads, _), (got, got_grads, _) = results
    assert rel_err(got, ref) <= 1e-12
    for label, g_got, g_ref in zip(["coefs", "bases", "mix", "a", "b", "h"], got_grads, ref_grads):
        if name.startswith("power") and label == "h":
            assert g_got is None  # the norms do not read h
            continue
        if label == "mix":  # mix is lower triangular by contract; the loop never reads above the diagonal
            g_got, g_ref = g_got.tril(), g_ref.tril()
        assert rel_err(g_got, g_ref) <= 1e-12, label


@pytest.mark.parametrize("name", ["softmax", "power4", "power3"])
def test_hand_written_backwards_pass_gradcheck(name):
    rows, cols = 3, 2
    tensors = [t.requires_grad_(True) for t in _chunk_inputs(n=1, c=3, rows=rows, cols=cols)]
    assert torch.autograd.gradcheck(lambda *x: _fast(name, *x, rows, cols), tensors)


CONFIGS = {"moneta": Moneta().parts, "memora": Memora().parts, "yaad": Yaad().parts, "titans": Titans().parts}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_memory_equals_token_loop_over_several_chunks(name):
    parts = CONFIGS[name]
    batch, heads, length, d, chunk = 2, 1, 48, 4, 16  # the MQAR layer's chunk of 16, three chunks
    q, k = (torch.nn.functional.normalize(torch.randn(batch, heads, length, d, **F64), dim=-1) for _ in range(2))
    v = torch.randn(batch, heads, length, d, **F64)
    gates = dict(lr=0.2 * torch.rand(batch, heads, length, **F64),
                 decay=1 - 0.3 * torch.rand(batch, heads, length, **F64))
    if name == "titans":
        gates["momentum"] = 0.1 + 0.8 * torch.rand(batch, heads, length, **F64)
    if name == "yaad":
        gates["delta"] = 0.5 + 1.5 * torch.rand(batch, heads, length, **F64)
    init = 0.5 * torch.randn(heads, param_count(parts, d, d), **F64)
    tensors = [q, k, v, init, *gates.values()]
    results = []
    for fn in (memory_naive, memory_chunk):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out, state = fn(*leaves[:3], parts=parts, init=leaves[3], chunk_size=chunk, output_state=True,
                        **dict(zip(gates, leaves[4:])))
        probe = torch.randn_like(out) if not results else results[0][3]
        ((out * probe).sum() + state.accum.sum()).backward()
        results.append((out.detach(), state.accum.detach(), [t.grad for t in leaves], probe))
    (ref, ref_state, ref_grads, _), (got, got_state, got_grads, _) = results
    assert rel_err(got, ref) <= 1e-10 and rel_err(got_state, ref_state) <= 1e-10
    for label, g_got, g_ref in zip(["q", "k", "v", "init", *gates], got_grads, ref_grads):
        assert rel_err(g_got, g_ref) <= 1e-9, label
