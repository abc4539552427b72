"""XAttention against a float64 loop implementation of the paper's rule, and the properties it claims."""
import math

import pytest
import torch

import blockattn
from blockattn.methods.xattention import XAttention
import blockattn.methods.xattention as xattention_module


def naive_xattention(q, k, *, threshold, stride, block, causal):
    """Loops: antidiagonal cell scores, causal softmax per strided row, block sums, cumulative selection."""
    q, k = q.double(), k.double()
    batch, heads, q_len, dim = q.shape
    group = heads // k.shape[1]
    k_len = k.shape[2]
    n_q, n_k = math.ceil(q_len / block), math.ceil(k_len / block)
    offset = k_len - q_len

    def token(x, i):
        return x[i] if i < x.shape[0] else torch.zeros(dim, dtype=torch.float64)

    selected = torch.zeros(batch, heads, n_q, n_k, dtype=torch.bool)
    all_scores = torch.zeros(batch, heads, n_q, n_k, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            qh, kh = q[b, h], k[b, h // group]
            scores = all_scores[b, h]
            for r in range(math.ceil(q_len / stride)):
                logits = {}
                for c in range(math.ceil(k_len / stride)):
                    if causal and c * stride > r * stride + stride - 1 + offset:
                        continue
                    logits[c] = sum(float(token(qh, r * stride + stride - 1 - i) @ token(kh, c * stride + i))
                                    for i in range(stride)) / (math.sqrt(dim) * stride)
                if not logits:  # a query cell before the first key (q_len > k_len) sees nothing
                    continue
                top = max(logits.values())
                norm = sum(math.exp(x - top) for x in logits.values())
                for c, x in logits.items():
                    scores[r * stride // block, c * stride // block] += math.exp(x - top) / norm
            selected[b, h] = naive_keep(scores, threshold=threshold, block=block, q_len=q_len, k_len=k_len,
                                        causal=causal)
    return selected, all_scores


def naive_keep(scores, *, threshold, block, q_len, k_len, causal):
    """The keep rule on one head's block scores [nQ, nK]: diagonal block first, the fewest blocks
    reaching the threshold, the first block outside the count."""
    n_q, n_k = scores.shape
    offset = k_len - q_len
    selected = torch.zeros(n_q, n_k, dtype=torch.bool)
    for qb in range(n_q):
        last = min((qb + 1) * block, q_len) - 1 + offset
        forced = {min(max(last, 0) // block, n_k - 1)} if causal else set()  # counted first
        order = sorted(range(n_k), key=lambda j: (j not in forced, -float(scores[qb, j]), j))
        total, mass = float(scores[qb].sum()), 0.0
        for j in order:
            if j in forced or (mass < threshold * total and scores[qb, j] > 0):
                selected[qb, j] = True
            mass += float(scores[qb, j])
        selected[qb, 0] = True  # always kept, outside the count
        if causal:  # tiles holding no causally visible pair are not listed
            selected[qb, max(last, -1) // block + 1:] = False
    return selected


@pytest.mark.parametrize("q_len,k_len,heads_kv,threshold,causal", [
    (96, 96, 2, 0.9, True), (88, 88, 1, 0.6, True), (40, 100, 2, 0.8, True), (96, 96, 2, 0.7, False),
    (100, 60, 2, 0.9, True), (200, 230, 3, 0.8, True), (200, 200, 1, 0.95, False)])
@pytest.mark.parametrize("band_rows", [1 << 20, 8, 1])  # one band, two block rows of cells, one block row
@pytest.mark.parametrize("low_precision", [False, True])
def test_selection_equals_naive_rule(q_len, k_len, heads_kv, threshold, causal, band_rows, low_precision,
                                     monkeypatch):
    monkeypatch.setattr(xattention_module, "_BAND_ROWS", band_rows)
    g = torch.Generator().manual_seed(q_len + k_len)
    # structured inputs so that scores are far from uniform and the threshold matters
    q = torch.randn(1, 2 * heads_kv, q_len, 8, generator=g) * 2
    k = torch.randn(1, heads_kv, k_len, 8, generator=g) * 2
    method = XAttention(threshold=threshold, stride=4, block_size=16, causal=causal, onednn_scoring=low_precision)
    layout = method.select(q, k)
    expected, naive_scores = naive_xattention(q, k, threshold=threshold, stride=4, block=16, causal=causal)
    if not low_precision:  # fp32 scoring: the naive rule's selection exactly
        assert torch.equal(layout.to_dense(), expected)
        return
    # bf16 scoring (on CPUs with bf16 units): scores within bf16 rounding of the float64 ones (each causal
    # row sums to block / stride = 4), and the keep rule applied exactly to the scores it computed
    scores = method.block_scores(q, k).double()
    assert torch.allclose(scores, naive_scores, atol=0.05, rtol=0.02)
    kept = torch.stack([naive_keep(scores[0, h], threshold=threshold, block=16, q_len=q_len, k_len=k_len,
                                   causal=causal) for h in range(scores.shape[1])])
    assert torch.equal(layout.to_dense()[0], kept)


def test_strided_inputs_select_like_contiguous_ones():
    # attention layers hand over q/k as transposed views of [B, L, H, D]; lengths multiples of the block
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 128, 4, 8, generator=g).transpose(1, 2)
    k = torch.randn(1, 128, 2, 8, generator=g).transpose(1, 2)
    method = XAttention(stride=4, block_size=16)
    assert torch.equal(method.select(q, k).to_dense(), method.select(q.contiguous(), k.contiguous()).to_dense())


def test_properties_mass_causality_forced_blocks():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 256, 16, generator=g) * 2, torch.randn(1, 2, 256, 16, generator=g) * 2
    method = XAttention(threshold=0.8, stride=8, block_size=32)
    scores = method.block_scores(q, k)
    blocks = method.select(q, k).to_dense()
    kept = (scores * blocks).sum(-1)
    assert (kept >= 0.8 * scores.sum(-1) - 1e-4).all()           # cumulative mass >= threshold
    assert not blocks.triu(1).any()                              # causal: no future block
    assert blocks.diagonal(dim1=-2, dim2=-1).all() and blocks[..., 0].all()  # always-kept blocks
    assert blocks.sum() < torch.ones(8, 8).tril().sum() * 4      # and it is sparse


def test_sparse_attention_equals_attention_over_selected_layout():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 3, 300, 32, generator=g) for _ in range(3))
    out = blockattn.sparse_attention(q, k, v, "xattention", threshold=0.5, block_size=64)
    layout = blockattn.methods.get("xattention", threshold=0.5, block_size=64).select(q, k)
    from blockattn.ops.reference import reference_attention
    assert torch.allclose(out.double(), reference_attention(q.double(), k.double(), v.double(), layout), atol=1e-5)


@pytest.mark.parametrize("params,message", [
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"), (dict(stride=0), "stride"),
    (dict(block_size=100, stride=8), "multiple of stride")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        blockattn.methods.get("xattention", **params)
    with pytest.raises(TypeError, match="does not take"):
        blockattn.methods.get("xattention", top_k=3)


def test_per_head_thresholds_and_calibration():
    g = torch.Generator().manual_seed(11)
    # heads of different sharpness: calibration should give the sharp head a lower threshold
    base = torch.randn(1, 2, 256, 16, generator=g)
    q = torch.cat([base[:, :1] * 4, base[:, 1:] * 0.3], dim=1)
    k = torch.randn(1, 1, 256, 16, generator=g) * 2
    method = XAttention(stride=4, block_size=32)
    split = XAttention(threshold=(0.5, 0.9), stride=4, block_size=32).select(q, k).to_dense()
    assert torch.equal(split[:, :1], XAttention(threshold=0.5, stride=4, block_size=32).select(q[:, :1], k).to_dense())
    assert torch.equal(split[:, 1:], XAttention(threshold=0.9, stride=4, block_size=32).select(q[:, 1:], k).to_dense())
    from blockattn.bench.quality import attention_recall
    calibrated = method.calibrate(q, k, target_recall=0.9)
    assert len(calibrated.threshold) == 2
    for h, t in enumerate(calibrated.threshold):
        layout = XAttention(threshold=t, stride=4, block_size=32).select(q[:, h:h + 1], k)
        assert attention_recall(q[:, h:h + 1], k, layout) >= 0.9 or t == 1.0
        smaller = [c for c in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0) if c < t]
        if smaller:  # the smallest candidate that reaches the target: the one below it does not
            below = XAttention(threshold=smaller[-1], stride=4, block_size=32).select(q[:, h:h + 1], k)
            assert attention_recall(q[:, h:h + 1], k, below) < 0.9
    with pytest.raises(ValueError, match="per-head"):
        XAttention(threshold=(0.5, 0.9, 0.9)).select(q, k)
    with pytest.raises(ValueError, match="threshold"):
        XAttention(threshold=(0.5, 1.5))


def test_scoring_leaves_torch_matmul_settings_as_they_were():
    before = torch.backends.mkldnn.matmul.fp32_precision
    XAttention(stride=4, block_size=16).select(torch.randn(1, 2, 64, 8), torch.randn(1, 1, 64, 8))
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_scoring_leaves_torch_precision_settings_as_they_were(monkeypatch):
    settings = torch.backends.mkldnn.matmul
    if not hasattr(settings, "fp32_precision"):
        pytest.skip("this torch has no mkldnn fp32_precision switch")
    seen = []
    real = XAttention._block_scores

    def spy(self, q, k):
        seen.append(settings.fp32_precision)
        return real(self, q, k)

    monkeypatch.setattr(XAttention, "_block_scores", spy)
    before = settings.fp32_precision
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
    XAttention(block_size=32).select(q, k)
    XAttention(block_size=32, onednn_scoring=False).select(q, k)
    assert settings.fp32_precision == before
    assert seen[1] == before  # onednn_scoring=False never touches the switch
