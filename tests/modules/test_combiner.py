"""Combiner: every factorisation equals a naive dense build of its implied probabilities, reaches every
earlier token, and its rows sum to 1."""
import pytest
import torch

from blockattn.modules import CombinerAttention
from blockattn.modules.combiner import combiner_axial, combiner_fixed, combiner_logsparse, merge_attention
import blockattn
from blockattn.layout import BlockLayout


def _softmax_over(logits):
    return torch.softmax(torch.stack(logits), 0)


def _region_value_weights(q_pool, k, region, scale):
    """q(j | region) over the region's tokens, from its pooled query."""
    return torch.softmax(torch.stack([q_pool @ k[j] * scale for j in region]), 0)


def naive_probabilities(q, k, factorisation, size=None, abstraction_keys=None):
    """The implied attention matrix P [L, L] of one head, built query by query from the paper's definition:
    a joint softmax over direct keys and region keys, a region's mass spread by q(j | region)."""
    length, dim = q.shape
    scale = dim ** -0.5
    P = torch.zeros(length, length, dtype=q.dtype)
    for i in range(length):
        direct, regions = [], []  # regions: (logit, {token: weight})
        if factorisation == "fixed":
            start = i // size * size
            direct = list(range(start, i + 1))
            for b in range(i // size):
                region = list(range(b * size, (b + 1) * size))
                q_pool, k_pool = q[region].amax(0), k[region].amax(0)
                weights = _region_value_weights(q_pool, k, region, scale)
                regions.append((q[i] @ k_pool * scale, dict(zip(region, weights))))
        elif factorisation == "logsparse":
            direct = [i]
            for level in range(max(length - 1, 0).bit_length()):
                if (i >> level) & 1:
                    c = (i >> level) - 1
                    region = list(range(c << level, (c + 1) << level))
                    q_pool, k_pool = q[region].amax(0), k[region].amax(0)
                    weights = _region_value_weights(q_pool, k, region, scale)
                    regions.append((q[i] @ k_pool * scale, dict(zip(region, weights))))
        else:  # axial, row-major rows of `size`
            r, t = divmod(i, size)
            direct = list(range(r * size, i + 1))
            for rr in range(r):
                region = list(range(rr * size, (rr + 1) * size))
                position = rr * size + t
                weights = _region_value_weights(q[position], k, region, scale)
                key = k[position] if abstraction_keys is None else abstraction_keys[position]
                regions.append((q[i] @ key * scale, dict(zip(region, weights))))
        probs = _softmax_over([q[i] @ k[j] * scale for j in direct] + [logit for logit, _ in regions])
        for j, p in zip(direct, probs):
            P[i, j] += p
        for (_, spread), p in zip(regions, probs[len(direct):]):
            for j, w in spread.items():
                P[i, j] += p * w
    return P


def _inputs(batch, heads_q, heads_kv, length, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, length, dim, generator=gen, dtype=dtype) for h in (heads_q, heads_kv, heads_kv)]


def _run(factorisation, q, k, v, size, **kw):
    if factorisation == "fixed":
        return combiner_fixed(q, k, v, block_size=size, **kw)
    if factorisation == "logsparse":
        return combiner_logsparse(q, k, v, **kw)
    return combiner_axial(q, k, v, row_length=size, **kw)


@pytest.mark.parametrize("factorisation,length,size", [("fixed", 30, 8), ("fixed", 32, 8), ("logsparse", 32, None),
                                                        ("logsparse", 37, None), ("axial", 32, 8)])
def test_output_equals_naive_factorised_probabilities_fp32(factorisation, length, size):
    q, k, v = _inputs(2, 4, 2, length, 16, seed=length)
    out = _run(factorisation, q.float(), k.float(), v.float(), size)
    for b in range(2):
        for h in range(4):
            P = naive_probabilities(q[b, h], k[b, h // 2], factorisation, size)
            torch.testing.assert_close(out[b, h].double(), P @ v[b, h // 2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factorisation,length,size", [("fixed", 64, 8), ("logsparse", 64, None),
                                                        ("logsparse", 65, None), ("axial", 64, 8)])
def test_every_earlier_token_reachable_and_rows_sum_to_one(factorisation, length, size):
    # with v = I the output row is the implied attention row itself
    q, k, _ = _inputs(1, 2, 2, length, 8, seed=3)
    eye = torch.eye(length, dtype=torch.float64).expand(1, 2, length, length)
    # zero channels pad q and k to D = L without changing a logit (the scale is given explicitly)
    q_eye, k_eye = (torch.nn.functional.pad(t, (0, length - 8)) for t in (q, k))
    P = _run(factorisation, q_eye, k_eye, eye.contiguous(), size, scale=8 ** -0.5)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert bool((P[..., causal] > 0).all()), "some earlier token has zero probability"
    assert bool((P[..., ~causal] == 0).all()), "a future token has probability"
    torch.testing.assert_close(P.sum(-1), torch.ones(1, 2, length, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    for h in range(2):
        torch.testing.assert_close(P[0, h], naive_probabilities(q[0, h], k[0, h], factorisation, size),
                                   rtol=1e-6, atol=1e-7)


def test_axial_with_projected_summary_keys_matches_naive():
    torch.manual_seed(0)
    module = CombinerAttention(16, 2, factorisation="axial", block_size=4).double()
    x = torch.randn(1, 16, 16, dtype=torch.float64)
    captured = {}
    original = module._split

    def spy(t):
        out = original(t)
        captured.setdefault("qkv", []).append(out)
        return out

    module._split = spy
    y = module(x)
    q, k, v, keys = captured["qkv"]  # the 4th split is the projected abstraction keys
    expected = torch.stack([naive_probabilities(q[0, h], k[0, h], "axial", 4, keys[0, h]) @ v[0, h] for h in range(2)])
    torch.testing.assert_close(y[0], module.proj(expected.transpose(0, 1).reshape(16, 16)), rtol=1e-6, atol=1e-6)


def test_merge_of_two_calls_equals_one_call_over_the_union():
    q, k, v = _inputs(1, 2, 2, 48, 8, dtype=torch.float32, seed=5)
    causal = BlockLayout.from_dense(torch.ones(3, 3, dtype=torch.bool), q_len=48, k_len=48, block_q=16,
                                    block_k=16, causal=True)
    diag = BlockLayout.from_dense(torch.eye(3, dtype=torch.bool), q_len=48, k_len=48, block_q=16, block_k=16,
                                  causal=True)
    below = BlockLayout.from_dense(torch.ones(3, 3, dtype=torch.bool).tril(-1), q_len=48, k_len=48, block_q=16,
                                   block_k=16, allow_empty_rows=True)
    out, lse = merge_attention([blockattn.attention(q, k, v, diag, return_lse=True),
                                blockattn.attention(q, k, v, below, return_lse=True)])
    ref, ref_lse = blockattn.attention(q, k, v, causal, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factorisation", ["fixed", "logsparse", "axial"])
def test_module_runs_backward_on_default_backend(factorisation):
    torch.manual_seed(1)
    module = CombinerAttention(32, 2, factorisation=factorisation, block_size=8)
    x = torch.randn(2, 32, 32, requires_grad=True)
    module(x).square().mean().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert all(p.grad is not None for p in module.parameters())


def test_bad_input():
    q, k, v = _inputs(1, 2, 2, 30, 8)
    with pytest.raises(ValueError, match="block_size"):
        combiner_fixed(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="row_length"):
        combiner_axial(q, k, v, row_length=8)
    with pytest.raises(ValueError, match="summary_key"):
        combiner_axial(q, k, v, row_length=5, summary_key="mean")
    with pytest.raises(ValueError, match="same length"):
        combiner_fixed(q, k[:, :, :20], v[:, :, :20], block_size=4)
    with pytest.raises(TypeError, match="q must be"):
        combiner_logsparse(q.numpy(), k, v)
    with pytest.raises(ValueError, match="factorisation"):
        CombinerAttention(16, 2, factorisation="mixture")
    with pytest.raises(ValueError, match="x must have shape"):
        CombinerAttention(16, 2)(torch.randn(2, 8, 12))


@pytest.mark.parametrize("factorisation,length,size", [("fixed", 24, 8), ("logsparse", 19, None), ("axial", 24, 6)])
def test_gradients_equal_naive_factorised_form(factorisation, length, size):
    # the direct and summary parts merge through lse, so this also checks the engine's lse gradient
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, length, 8, seed=7))
    _run(factorisation, q, k, v, size, backend="torch").square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out = torch.stack([naive_probabilities(q[0, h], k[0, 0], factorisation, size) @ v[0, 0] for h in range(2)])
    out.square().sum().backward()
    for g, w in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
