"""SALE against a float64 loop re-creation of the official kernel's rule: per-token int4 estimates of
key-mean-smoothed q/k, exact softmax statistics over the sink and the segment-aligned local window,
and the strict test exp(scale * s^ - m) / l > threshold per 32-key block."""
import math

import pytest
import torch

import blockattn
from blockattn.methods.sale import SALE


def naive_sale_blocks(q, k, *, bits, threshold, bq=64, bk=32, local=128, segment=256):
    """bool [B, H, nQ, nK] kept blocks and float64 [B, H, nQ, nK] log-margins (max over the block's
    pairs of scale * s^ - log(l) - m - log(threshold); inf for forced blocks)."""
    q, k = q.double(), k.double()
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    top = 2 ** (bits - 1) - 1
    scale = 1 / math.sqrt(dim)
    n_q, n_k = -(-length // bq), -(-length // bk)
    margin = torch.full((batch, heads, n_q, n_k), -math.inf, dtype=torch.float64)

    def quantize(x):  # one scale per token (row)
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            s = max(float(x[i].abs().max()), 1e-12) / top
            out[i] = torch.round(x[i] / s) * s
        return out

    for b in range(batch):
        for h in range(heads):
            qq, kk = q[b, h], k[b, h // group]
            q_mean, k_mean = qq.mean(0), kk.mean(0)
            q_s, k_s = qq - q_mean, kk - k_mean
            q_hat, k_hat = quantize(q_s), quantize(k_s)
            for m in range(n_q):
                end = min((m + 1) * bq, length)
                n_blocks = -(-end // bk)
                per = segment // bk
                segments = max(0, (n_blocks - 1 - local // bk) // per)
                first_local = 1 + segments * per
                margin[b, h, m, 0] = math.inf
                margin[b, h, m, first_local:n_blocks] = math.inf
                for i in range(m * bq, end):
                    reference = list(range(min(bk, i + 1))) + list(range(first_local * bk, i + 1))
                    exact = scale * (k_s[reference] @ qq[i])
                    top_logit = float(exact.max())
                    row_sum = float((exact - top_logit).exp().sum())
                    estimates = q_hat[i] @ k_hat.T + q_mean @ k_s.T  # every key's estimated logit
                    for c in range(1, first_local):
                        weight = scale * float(estimates[c * bk:(c + 1) * bk].max()) - top_logit \
                            - math.log(row_sum) - math.log(threshold)
                        margin[b, h, m, c] = max(float(margin[b, h, m, c]), weight)
    return margin > 0, margin


def structured_qk(length, *, seed, heads=4, heads_kv=2, dim=16, amplitude=2.5):
    """Rotary-like q/k whose logits peak near the diagonal (so blocks differ), noise, and a channel
    bias in the keys (what the smoothing removes)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(length, dtype=torch.float32).view(-1, 1)
    freqs = 1 / (3 * 2.0 ** torch.arange(dim // 2))
    wave = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], -1) * amplitude  # [L, D]
    q = wave + 0.7 * torch.randn(1, heads, length, dim, generator=g)
    k = wave + 0.7 * torch.randn(1, heads_kv, length, dim, generator=g) + 3 * torch.randn(dim, generator=g)
    return q, k


@pytest.mark.parametrize("length,bits,threshold", [(700, 4, 0.01), (900, 4, 0.003), (600, 8, 0.02)])
def test_selection_equals_official_rule(length, bits, threshold):
    q, k = structured_qk(length, seed=length + bits, heads=2, heads_kv=1)
    method = SALE(bits=bits, threshold=threshold, dense_below=0)
    keep, margin = naive_sale_blocks(q, k, bits=bits, threshold=threshold)
    got = method.select(q, k).to_dense()
    causal = torch.ones(keep.shape[-2:], dtype=torch.bool)
    rows = torch.arange(keep.shape[-2]).view(-1, 1)
    causal = torch.arange(keep.shape[-1]).view(1, -1) * 32 <= torch.clamp((rows + 1) * 64, max=length) - 1
    clear = margin.abs() > 1e-4  # float32 ties at the threshold itself
    assert torch.equal(got[clear], (keep & causal)[clear])
    # the rule is selective on these inputs, and the log-margins match the float64 ones
    estimated = torch.isfinite(margin)
    assert 0.05 < keep[estimated].float().mean() < 0.95
    log_scores = method.log_scores(q, k).double() - math.log(threshold)
    assert torch.allclose(log_scores[estimated], margin[estimated], atol=1e-3)


def test_official_criterion_is_not_the_global_estimate_max():
    # the reference is the exact sink + window softmax (m, l), not the row's largest estimate: on the
    # same inputs the old rule exp(s^ - max s^) >= threshold keeps a different set of blocks
    q, k = structured_qk(700, seed=3, heads=2, heads_kv=1)
    keep, margin = naive_sale_blocks(q, k, bits=4, threshold=0.01)
    log_scores = SALE(threshold=0.01, dense_below=0).log_scores(q, k)
    estimated = torch.isfinite(margin)
    assert torch.equal(log_scores[estimated] > math.log(0.01), keep[estimated])
    dim = q.shape[-1]
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(dim)
    logits = logits.masked_fill(torch.ones(700, 700, dtype=torch.bool).triu(1), -math.inf)
    relative = (logits - logits.amax(-1, keepdim=True)).exp()
    per_block = torch.nn.functional.pad(relative, (0, 4)).view(1, 2, 700, -1, 32).amax(-1)
    per_block = torch.nn.functional.pad(per_block, (0, 0, 0, 4)).view(1, 2, -1, 64, per_block.shape[-1]).amax(3)
    old_keep = per_block >= 0.01
    assert not torch.equal(old_keep[estimated], keep[estimated])


def test_dense_fallbacks_sink_and_window_forced():
    q, k = structured_qk(1024, seed=5)
    assert SALE().select(q, k).density("causal") == 1.0          # <= 1024 tokens: dense, as official
    assert SALE(threshold=1e-6, dense_below=0).select(q, k).density("causal") == 1.0
    method = SALE(threshold=0.5, dense_below=0)
    blocks = method.select(q, k).to_dense()
    starts = method.local_start(1024)
    n_k = blocks.shape[-1]
    cols = torch.arange(n_k).view(1, -1)
    ends = torch.clamp((torch.arange(len(starts)) + 1) * 64, max=1024)
    causal = cols * 32 <= (ends - 1).view(-1, 1)
    assert blocks[..., 0].all()
    assert blocks[..., (cols >= starts.view(-1, 1)) & causal].all()
    # at least 128 keys of local window, at most 128 + 256 - 32 (one segment short of the next)
    local_keys = (ends - starts * 32)
    assert (local_keys[starts > 1] >= 128).all() and (local_keys <= 128 + 256 - 32 + 64).all()
    assert not (blocks & ~causal).any()


def test_attention_through_layout_is_exact():
    q, k = structured_qk(1100, seed=7, heads=2, heads_kv=1)
    v = torch.randn(1, 1, 1100, 16)
    from blockattn.ops.reference import reference_attention
    method = SALE(threshold=0.05, dense_below=0)
    out = blockattn.sparse_attention(q, k, v, "sale", threshold=0.05, dense_below=0)
    ref = reference_attention(q.double(), k.double(), v.double(), method.select(q, k))
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("params,message", [(dict(bits=3), "bits"), (dict(threshold=0), "threshold"),
                                            (dict(threshold=1.5), "threshold"), (dict(block_size=0), "block_size"),
                                            (dict(local_window=100), "local_window"),
                                            (dict(dense_below=-1), "dense_below")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        blockattn.methods.get("sale", **params)
