"""XAttention: Block Sparse Attention with Antidiagonal Scoring (Xu et al., 2025).

Rule: a block's importance is estimated by summing its attention along antidiagonals sampled
every `stride` tokens. Concretely, queries are regrouped as `q[r*S + S-1-i]` and keys as
`k[c*S + i]` (i < S) and concatenated along the feature axis, so one dot product of the regrouped
rows is the sum of the S x S cell's antidiagonal of Q K^T. Those strided scores (scaled by
1/(sqrt(D)*S), causal at cell granularity) are softmax-normalised per row and summed per
(block_size/S)^2 cell group into block scores; each query block then keeps the fewest key blocks
whose scores reach `threshold` of the row's total, counting the diagonal block (its own tokens,
causal only) first; the first block is always kept as well, outside the count, as the official
`find_blocks_chunked` does for prompts within one estimation chunk (16k tokens). A `BlockScorer`:
`_score_blocks` gives the block scores with the diagonal forced and block 0 always kept, the base
class applies the cumulative threshold.

Checks done: with fp32 scoring (`onednn_scoring=False`) the selection equals a float64 loop
implementation of this rule in tests/methods/test_xattention.py; with the default bf16 scoring (CPUs
with bf16 units) the scores agree with it within bf16 rounding and the keep rule, applied to those
scores, matches it exactly. Side by side with the official torch path
(`xattn_estimate(..., use_triton=False)` of mit-han-lab/x-attention, run on CPU outside the repo
with its `.to("cuda")` calls pointed at the CPU; random 1k/2k-token inputs, thresholds 0.5/0.9/0.95,
block 128, stride 8): the official selection is a superset of ours, one extra block per row at
most, because its cumulative sum lags one block behind its ranking when the first block falls
inside the diagonal window; modelling that lag reproduced the official blocks exactly in all six
cases. This class keeps the paper's rule (the fewest blocks reaching the threshold).

Causality: the selection is block-granular. A query block's scores sum over all its queries, so in
prefill the later tokens of a query block can change the key blocks its earlier tokens attend to
(never letting them see a later key), as in the official code.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.methods import register
from blockattn import _checks
from blockattn._checks import check_qk
from blockattn.methods._select import cpu_has_bf16_units
from blockattn.methods.base import BlockScorer, BlockScores

# Strided query rows scored at once: bands bound memory (at most _BAND_ELEMENTS scores, 16 MiB) and let
# causal bands skip the columns after them; short bands keep the masked diagonal triangle (band^2 / 2
# cells per band) small.
_BAND_ELEMENTS = 1 << 22
_BAND_ROWS = 128


def _scoring_dtype(low_precision: bool, device: torch.device) -> torch.dtype:
    """bf16 on CPUs with bf16 dot-product units (AVX512-BF16 / AMX) when `low_precision`: torch runs
    bf16 GEMMs there through oneDNN, about 6x faster than fp32 for these shapes on the AVX-512 CPU this
    project measures on (fp32 inputs are rounded to bf16 once, the logits come out in bf16 and the
    softmax runs in fp32: block scores move by ~1e-2 of a block's mass). The official code scores the
    model's bf16/fp16 q/k on GPUs, so the inputs' rounding is the method's own; the bf16 logits are
    ours. fp32 everywhere else (GPUs included)."""
    return torch.bfloat16 if low_precision and device.type == "cpu" and cpu_has_bf16_units() else torch.float32


@register("xattention")
@dataclasses.dataclass
class XAttention(BlockScorer):
    """Args:
        threshold: cumulative block-score mass to keep per query block, in (0, 1]. Paper default 0.9.
            A tuple gives one threshold per query head (see `calibrate`).
        thresholds: path of per-layer/per-head thresholds (JSON written by `blockattn calibrate xattention`,
            the paper's per-head setting); `select` then needs `layer=` and uses that layer's tuple instead
            of `threshold`.
        stride: antidiagonal sampling stride S. Paper default 8.
        block_size: block size of the layout (queries and keys). Paper default 128.
        causal: causal attention (LLM prefill).
        onednn_scoring: on CPUs with bf16 units, score with bf16 GEMMs (torch sends them to oneDNN;
            see `_scoring_dtype`); False scores in fp32. No torch setting is touched either way.
    """

    within_block_lookahead = True  # a query block's scores sum over all its queries
    threshold: float | tuple = 0.9
    stride: int = 8
    block_size: int = 128
    causal: bool = True
    onednn_scoring: bool = True
    thresholds: str | None = None

    queries_before_keys = True  # causal q_len > k_len: the first queries precede every key

    def __post_init__(self):
        if isinstance(self.threshold, (tuple, list)):
            if not self.threshold:
                raise ValueError("threshold must be one value or one per query head, got an empty sequence")
            self.threshold = tuple(_checks.fraction_arg(f"threshold[{i}]", t) for i, t in enumerate(self.threshold))
        else:
            _checks.fraction_arg("threshold", self.threshold)
        self.check_positive_ints("stride", "block_size")
        if self.block_size % self.stride:
            raise ValueError(f"block_size must be a positive multiple of stride={self.stride}, got {self.block_size!r}")
        _checks.bool_arg("causal", self.causal)
        _checks.bool_arg("onednn_scoring", self.onednn_scoring)
        self._per_layer = None
        if self.thresholds is not None:
            from blockattn.methods.calibration import load_thresholds
            self._per_layer, header = load_thresholds(self.thresholds)
            for name in ("stride", "block_size"):
                if header.get(name, getattr(self, name)) != getattr(self, name):
                    raise ValueError(f"thresholds={self.thresholds!r} was calibrated with {name}={header[name]}, "
                                     f"this XAttention has {name}={getattr(self, name)}")

    def layer_threshold(self, layer: int | None) -> float | tuple:
        """The threshold `select` uses: layer `layer`'s per-head tuple from `thresholds`, else `threshold`."""
        if self._per_layer is None:
            return self.threshold
        if layer is None:
            raise ValueError(f"xattention with thresholds={self.thresholds!r} needs select(..., layer=i): its "
                             "thresholds are per layer")
        if layer >= len(self._per_layer):
            raise ValueError(f"layer {layer} is past the {len(self._per_layer)} layers of "
                             f"thresholds={self.thresholds!r}")
        return self._per_layer[layer]

    def block_scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Antidiagonal block scores `[B, Hq, nQ, nK]` (each causal row sums to ~block_size/stride)."""
        check_qk(q, k)
        return self._block_scores(q, k)

    def _block_scores(self, q: Tensor, k: Tensor) -> Tensor:
        batch, heads, q_len, dim = q.shape
        heads_kv, k_len = k.shape[1], k.shape[2]
        group = heads // heads_kv
        S, block = self.stride, self.block_size
        per_block = block // S
        n_q, n_k = -(-q_len // block), -(-k_len // block)
        rows, cols = n_q * per_block, n_k * per_block
        real_rows = -(-q_len // S)  # query cells holding at least one real query
        dtype = _scoring_dtype(self.onednn_scoring, q.device)
        # Query cells in order against key cells reversed within the cell: one dot product of the
        # regrouped rows, sum_i q[r*S + i] . k[c*S + S-1-i], is the sum of an S x S cell's antidiagonal.
        # Queries stay a view in the scoring dtype (padded only to whole cells); keys (fewer heads) take
        # the copy: reversed by index_select (torch's flip is far slower), scaled by 1/(sqrt(D)*S).
        q_cells = q.to(dtype)
        if real_rows * S != q_len:
            q_cells = torch.nn.functional.pad(q_cells, (0, 0, 0, real_rows * S - q_len))
        q_cells = q_cells.reshape(batch, heads_kv, group, real_rows, S * dim)
        k_cells = k if n_k * block == k_len else torch.nn.functional.pad(k, (0, 0, 0, n_k * block - k_len))
        reverse = torch.arange(S - 1, -1, -1, device=q.device)
        k_cells = k_cells.reshape(batch, heads_kv, cols, S, dim).index_select(3, reverse)
        k_cells = torch.mul(k_cells, 1.0 / (dim ** 0.5 * S),
                            out=torch.empty(k_cells.shape, dtype=dtype, device=q.device))
        k_cells = k_cells.view(batch, heads_kv, cols, S * dim)
        valid_cols = -(-k_len // S)   # key cells holding at least one real key
        offset = k_len - q_len        # bottom-right alignment of queries against keys
        # cell (r, c) is causally visible when its first key is not after the query cell's last query
        reach = (S - 1 + offset) // S  # visible iff c - r <= reach
        scores = torch.zeros(batch, heads_kv, group, n_q, n_k, device=q.device)
        band = per_block * max(1, min(_BAND_ROWS, _BAND_ELEMENTS // max(1, heads * cols)) // per_block)
        triangles = {}
        for start in range(0, rows, band):
            stop = min(rows, start + band)
            real = min(stop, real_rows) - start  # the band's rows past q_len are padding: not scored
            width = cols
            if self.causal:  # rows of this band never see cells past the band's last row's reach
                width = min(cols, -(-(stop + reach) // per_block) * per_block)
                if width <= 0:  # the whole band precedes the first key (q_len > k_len)
                    continue
            # the group of query heads a key head serves, stacked row-wise: one GEMM per key head, as
            # torch.mm on 2-D views (bmm and matmul copy the sliced, transposed keys first, which cost
            # more than the GEMM in bf16)
            logits = torch.empty(batch * heads_kv, group * real, width, dtype=dtype, device=q.device)
            rows_band = q_cells[:, :, :, start:start + real].reshape(batch * heads_kv, group * real, S * dim)
            keys_band = k_cells[:, :, :width].reshape(batch * heads_kv, width, S * dim)
            for i in range(batch * heads_kv):
                torch.mm(rows_band[i], keys_band[i].t(), out=logits[i])
            logits = logits.view(batch, heads_kv, group, real, width)
            if valid_cols < width:
                logits[..., valid_cols:] = float("-inf")
            lo = start + reach + 1  # every row of the band sees the columns before this one
            if self.causal and lo < 0:  # queries before the first key (q_len > k_len): mask cell by cell
                row = torch.arange(start, start + real, device=q.device).view(-1, 1)
                logits.masked_fill_(torch.arange(width, device=q.device) - row > reach, float("-inf"))
            elif self.causal and lo < width:
                # past `lo`, row start+i sees column lo+j iff j < i: the same triangle in every band
                if (real, width - lo) not in triangles:
                    triangles[real, width - lo] = torch.ones(real, width - lo, dtype=torch.bool,
                                                             device=q.device).triu()
                logits[..., lo:width].masked_fill_(triangles[real, width - lo], float("-inf"))
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            if self.causal and reach < 0:  # rows before the first key see nothing: 0/0 -> 0
                probs = probs.nan_to_num_(0.0)
            # key cells first (a contiguous reduction), then the per_block query cells of each block
            sums = probs.view(batch, heads_kv, group, real, width // per_block, per_block).sum(-1)
            if real < stop - start:  # padding query cells carry no mass
                sums = torch.nn.functional.pad(sums, (0, 0, 0, stop - start - real))
            sums = sums.view(batch, heads_kv, group, (stop - start) // per_block, per_block, width // per_block)
            scores[:, :, :, start // per_block:stop // per_block, :width // per_block] = sums.sum(4)
        return scores.view(batch, heads, n_q, n_k)

    def _score_blocks(self, q: Tensor, k: Tensor, *, causal: bool) -> BlockScores:
        scores = self.block_scores(q, k)
        n_q, n_k = scores.shape[-2:]
        q_len, k_len = q.shape[2], k.shape[2]
        forced = None
        if causal:
            # the block holding each query block's last query (in the key frame): its own tokens
            forced = torch.zeros(n_q, n_k, dtype=torch.bool, device=q.device)
            last_query = ((torch.arange(n_q, device=q.device) + 1) * self.block_size).clamp(max=q_len) - 1
            forced[torch.arange(n_q, device=q.device), ((last_query + k_len - q_len) // self.block_size).clamp(0, n_k - 1)] = True
        # the first block is kept too, outside the mass count, as the official selection does
        first = torch.arange(n_k, device=q.device) == 0
        return BlockScores(scores, self.block_size, self.block_size, forced=forced, always=first)

    def _keep_value(self, blocks: BlockScores, layer: int | None):
        threshold = self.layer_threshold(layer)
        if isinstance(threshold, tuple):
            scores = blocks.scores
            if len(threshold) != scores.shape[1]:
                what = f"thresholds={self.thresholds!r} layer {layer}" if self._per_layer else "threshold"
                raise ValueError(f"{what} has {len(threshold)} per-head values but q has {scores.shape[1]} heads")
            threshold = torch.tensor(threshold, dtype=scores.dtype, device=scores.device).view(1, -1, 1, 1)
        return threshold

    def calibrate(self, q: Tensor, k: Tensor, *, target_recall: float = 0.95,
                  candidates: tuple = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)) -> "XAttention":
        """Per-head threshold calibration on sample q/k (the paper calibrates thresholds per head
        offline): each query head gets the smallest candidate whose layout keeps at least
        `target_recall` of that head's dense attention mass. Returns a copy with the tuple of thresholds."""
        from blockattn.bench.quality import attention_recall
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must lie in (0, 1], got {target_recall}")
        heads, group = q.shape[1], q.shape[1] // k.shape[1]
        chosen = []
        for h in range(heads):
            q_h, k_h = q[:, h:h + 1], k[:, h // group:h // group + 1]
            pick = max(candidates)
            for t in sorted(candidates):
                layout = dataclasses.replace(self, threshold=float(t)).select(q_h, k_h)
                if attention_recall(q_h, k_h, layout, causal=self.causal) >= target_recall:
                    pick = t
                    break
            chosen.append(float(pick))
        return dataclasses.replace(self, threshold=tuple(chosen))
