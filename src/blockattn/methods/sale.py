"""SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context LLM Prefilling (Ji et al., 2025).

Rule, as the official kernel applies it (BirdChristopher/SALE: `flash_attn_int4_skip.py`, the int4
quantizer in `quant_triton.py`, `flash_fwd_int4_sparse_kernel_v2.h`, `softmax.h`), per query head:

1. Smoothing and quantization: the sequence means are subtracted (`q_s = q - mean(q)`, `k_s = k -
   mean(k)`), and each token of q_s and k_s is quantized symmetrically to `bits`-bit integers with
   its own scale (max |x| / 7 for int4). The estimated logit of every pair is the dequantized
   product plus the exact mean term: `s^_ij = deq(q_s,i) . deq(k_s,j) + mean(q) . k_s,j` (in the
   frame of the smoothed keys, as the kernel's exact part, which runs on `k_s`).
2. Exact reference: each query block of `block_size` (64) rows first computes the sink (key block 0
   of `key_block` = 32 tokens) and its local window exactly. The local window is the last
   `n_local` key blocks before the block's causal end, where whole segments of `segment` (256)
   keys are left to the estimate as long as at least `local_window` (128) keys stay local: n_local
   = n - (segment / key_block) * floor((n - local_window / key_block) / (segment / key_block)) for
   the n key blocks after the sink (all of them when that floor is <= 0). Their exact softmax
   statistics (row max m_i and row sum l_i, causal) are the reference.
3. Keep rule: a key block between the sink and the local window is computed when, for some row i of
   the query block, exp(scale * (max_j s^_ij - m_i)) / l_i > `threshold` (strictly), i.e. when
   scale * s^_ij > logsumexp_i + log(threshold) for some pair. A threshold below 1e-5 makes the
   head dense, and prompts of at most `dense_below` (1024) tokens run dense, as the official code does.

The layout uses the kernel's tiles (64 query x 32 key tokens): sink, local window and kept blocks,
causal (a `BlockScorer` keeping the blocks "above" log(threshold), the sink and window forced). Deliberate differences: the reference statistics and comparisons are float32 (the kernel's
are fp16); per-head thresholds from the official calibration (start at 0.008, halve until the
output error is small) are not computed: `threshold` is one value for all heads, and its default
1e-3 is our choice (the README example uses 0.004). In a prompt the selection is block-granular:
later rows of a query block can change which key blocks the block's earlier rows see.

Checks done: `tests/methods/test_sale.py` compares the kept blocks with a float64 loop re-creation
of the three steps above (per-token smoothing and quantization, per-row exact statistics over the
official sink and window, the strict comparison), on inputs with a channel bias in the keys.
Cost: the estimate covers every causal pair (as many dot products as the attention's QK^T; the
official kernel affords it with int4 tensor cores), so on a CPU the selection costs about as much as
the attention it prunes (benchmarks/selection.py, docs/bench/selection.md).

Causality: the selection is block-granular. A tile is kept when any of its query rows passes the
test, so in prefill the later tokens of a query block can change the key tiles its earlier tokens
attend to (never letting them see a later key), as in the official kernel.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.methods import register
from blockattn import _checks
from blockattn._checks import check_qk
from blockattn.methods._select import expand_kv_heads
from blockattn.methods.base import BlockScorer, BlockScores, PrefillMethod

_BAND_ROWS = 256  # query rows whose estimates are formed at once (memory O(rows x L))


def quantize_tokens(x: Tensor, bits: int) -> Tensor:
    """Symmetric per-token fake quantization of `[..., L, D]`: each token's integers times its scale
    (max |x| / (2^(bits-1) - 1)), returned dequantized (the products are the kernel's)."""
    top = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
    return torch.round(x / scale) * scale  # round half to even, as float2int_rn


@register("sale")
@dataclasses.dataclass
class SALE(BlockScorer, PrefillMethod):
    """Args:
        bits: integer width of the estimate (paper: 4; 8 also supported).
        block_size: query block of the layout (official kernel: 64).
        key_block: key block of the layout and of the keep decision (official kernel: 32).
        threshold: minimum relative attention weight exp(s - m) / l of a computed key block, in (0, 1].
        local_window: keys always computed exactly before each block's causal end (official: 128).
        segment: the estimate runs over whole segments of this many keys (official block_seg: 256).
        dense_below: prompts of at most this many tokens run dense (official: 1024; 0 = never).
    """

    within_block_lookahead = True  # a tile is kept when any query row of the block passes
    bits: int = 4
    block_size: int = 64
    key_block: int = 32
    threshold: float = 1e-3
    local_window: int = 128
    segment: int = 256
    dense_below: int = 1024

    keep_rule = "above"

    def __post_init__(self):
        _checks.choice_arg("bits", _checks.int_arg("bits", self.bits), (4, 8))
        self.check_positive_ints("block_size", "key_block", "local_window", "segment")
        _checks.int_arg("dense_below", self.dense_below, minimum=0)
        _checks.fraction_arg("threshold", self.threshold)
        for name in ("local_window", "segment"):
            if getattr(self, name) % self.key_block:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of key_block ({self.key_block})")

    def local_start(self, length: int, device=None) -> Tensor:
        """`[nQ]`: the first key block of each query block's exact local window (1 = right after the sink)."""
        bq, bk = self.block_size, self.key_block
        n_q = -(-length // bq)
        ends = ((torch.arange(n_q, device=device) + 1) * bq).clamp(max=length)
        after_sink = -(-ends // bk) - 1                     # key blocks between the sink and the causal end
        per_segment = self.segment // bk
        segments = ((after_sink - self.local_window // bk).div(per_segment, rounding_mode="floor")).clamp(min=0)
        return 1 + segments * per_segment

    def log_scores(self, q: Tensor, k: Tensor) -> Tensor:
        """`[B, Hq, nQ, nK]` float32: for each key block between the sink and the local window, the
        largest `scale * s^_ij - logsumexp_i` over its pairs (the log of the largest relative weight
        exp(s^ - m) / l); -inf for the sink, local and future blocks."""
        batch, heads, length, dim = q.shape
        heads_kv = k.shape[1]
        group = heads // heads_kv
        bq, bk = self.block_size, self.key_block
        n_q, n_k = -(-length // bq), -(-length // bk)
        scale = dim ** -0.5
        device = q.device
        q_mean = q.float().mean(2, keepdim=True)
        k_s = k.float() - k.float().mean(2, keepdim=True)
        q_s = q.float() - q_mean
        q_hat, k_hat = quantize_tokens(q_s, self.bits), quantize_tokens(k_s, self.bits)
        lse = self._reference_lse(q, k_s)                                          # [B, Hq, L]
        # one GEMM per band gives scale * s^_ij - lse_i: queries [scale * q^, scale, -lse],
        # keys [k^, mean(q) . k_s (per query head), 1]
        qmk = (q_mean.view(batch, heads_kv, group, 1, dim) @ k_s.unsqueeze(2).transpose(-1, -2))
        keys = torch.cat([k_hat.unsqueeze(2).expand(-1, -1, group, -1, -1), qmk.transpose(-1, -2),
                          torch.ones(batch, heads_kv, group, length, 1, device=device)], -1)
        keys = keys.reshape(batch, heads, length, dim + 2)
        rows = torch.cat([q_hat.view(batch, heads, length, dim) * scale,
                          torch.full((batch, heads, length, 1), scale, device=device), -lse.unsqueeze(-1)], -1)
        rows = torch.nn.functional.pad(rows, (0, 0, 0, n_q * bq - length))
        rows[:, :, length:, -1] = float("-inf")  # padding rows never keep a block
        starts = self.local_start(length, device)                                  # [nQ]
        scores = torch.full((batch, heads, n_q, n_k), float("-inf"), device=device)
        band = max(1, _BAND_ROWS // bq)
        for first in range(0, n_q, band):
            stop = min(n_q, first + band)
            width = int(starts[first:stop].max()) * bk  # keys any block of the band estimates
            if width <= bk:
                continue
            est = rows[:, :, first * bq:stop * bq] @ keys[:, :, bk:width].transpose(-1, -2)
            pooled = est.view(batch, heads, stop - first, bq, -1, bk).amax(-1).amax(3)
            scores[:, :, first:stop, 1:width // bk] = pooled
        estimated = torch.arange(n_k, device=device).view(1, -1) < starts.view(-1, 1)
        estimated[:, 0] = False
        return scores.masked_fill(~estimated, float("-inf"))

    def _reference_lse(self, q: Tensor, k_s: Tensor) -> Tensor:
        """`[B, Hq, L]`: each row's exact log-sum-exp (scaled logits) over the sink and its local window."""
        batch, heads, length, dim = q.shape
        heads_kv = k_s.shape[1]
        group = heads // heads_kv
        bq, bk = self.block_size, self.key_block
        n_q = -(-length // bq)
        device = q.device
        scale = dim ** -0.5
        sink = min(bk, length)
        per_segment = self.segment // bk
        width = (self.local_window // bk + per_segment) * bk + bq  # the widest local window of a block
        first = self.local_start(length, device) * bk                              # [nQ] first local key
        cols = first.view(-1, 1) + torch.arange(width, device=device)             # [nQ, W]
        row_pos = torch.arange(n_q * bq, device=device).view(n_q, bq)
        valid = (cols.unsqueeze(1) <= row_pos.unsqueeze(2)) & (cols.unsqueeze(1) < length)  # [nQ, bq, W]
        padded = torch.nn.functional.pad(k_s, (0, 0, 0, width + bk))
        window = padded[:, :, cols.clamp(max=length + width + bk - 1)]           # [B, Hkv, nQ, W, D]
        queries = torch.nn.functional.pad(q.float() * scale, (0, 0, 0, n_q * bq - length))
        queries = queries.view(batch, heads_kv, group, n_q, bq, dim).transpose(2, 3)  # [B, Hkv, nQ, g, bq, D]
        local = queries.reshape(batch, heads_kv, n_q, group * bq, dim) @ window.transpose(-1, -2)
        local = local.view(batch, heads_kv, n_q, group, bq, width).masked_fill(~valid.unsqueeze(1), float("-inf"))
        sink_logits = queries.reshape(batch, heads_kv, n_q, group * bq, dim) @ k_s[:, :, :sink].unsqueeze(2) \
            .transpose(-1, -2)
        sink_logits = sink_logits.view(batch, heads_kv, n_q, group, bq, sink)
        sink_future = torch.arange(sink, device=device).view(1, 1, -1) > row_pos.unsqueeze(-1)  # [nQ, bq, sink]
        sink_logits = sink_logits.masked_fill(sink_future.unsqueeze(1), float("-inf"))
        lse = torch.logsumexp(torch.cat([sink_logits, local], -1), -1)           # [B, Hkv, nQ, g, bq]
        return lse.transpose(2, 3).reshape(batch, heads, n_q * bq)[..., :length]

    def _score_blocks(self, q: Tensor, k: Tensor, *, causal: bool) -> BlockScores:
        # the sink and the local window are always computed; short prompts (and thresholds below 1e-5) dense
        length = q.shape[2]
        bq, bk = self.block_size, self.key_block
        n_q, n_k = -(-length // bq), -(-length // bk)
        if length <= self.dense_below or self.threshold < 1e-5:
            dense = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=q.device)
            return BlockScores(torch.zeros(1, 1, n_q, n_k, device=q.device), bq, bk, forced=dense)
        local = torch.arange(n_k, device=q.device).view(1, -1) >= self.local_start(length, q.device).view(-1, 1)
        local[:, 0] = True
        return BlockScores(self.log_scores(q, k), bq, bk, forced=local)

    def _keep_value(self, blocks: BlockScores, layer: int | None) -> Tensor:
        # log_scores hold log relative weights: a block is kept when its weight exceeds the threshold
        return torch.log(torch.tensor(self.threshold, dtype=torch.float32))
