"""SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context LLM Prefilling (Ji et al., 2025).

Rule: queries and keys are quantized symmetrically to `bits`-bit integers with one scale per block
of `block_size` tokens (per head), and the low-bit products give a fine-grained estimate of every
causal logit. A (query block, key block) tile is computed when its Relative Attention Score -- the
largest estimated attention weight of the tile relative to its row's maximum estimated logit,
max exp(s_ij - max_j s_ij) over the tile's causal pairs -- reaches `threshold`. The first key
block (attention sink) and the diagonal block are always computed.

Check done: the selection equals a float64 loop implementation of this rule in
tests/methods/test_sale.py. No side-by-side run: the official code (BirdChristopher/SALE,
int4_flash_attn/flash_attn_int4_skip.py) has no CPU path; its tile selection runs inside the CUDA
kernel `flash_attn_2_cuda_int4_skip` and its int4 quantization in Triton. Read from its Python
wrapper, not modelled here: keys are smoothed (their mean subtracted) before the int4
quantization, block_q 64 / block_k 32 with a 128-token local window, per-head thresholds (README
example 0.004, calibrated per model), dense attention for sequences of at most 1024 tokens.
`threshold`'s default is our choice, not a value verified in the paper.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn import _checks
from blockattn._checks import check_qk
from blockattn.methods._select import expand_kv_heads
from blockattn.methods.base import Method

_BAND_ROWS = 512  # estimated logits are formed this many query rows at a time


def quantize_blocks(x: Tensor, bits: int, block: int) -> Tensor:
    """Symmetric per-block fake quantization of `[B, H, L, D]` along L: integers times their block's scale.
    Returned as (integers, scales) with integers exact in float32."""
    batch, heads, length, dim = x.shape
    n = -(-length // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - length)).view(batch, heads, n, block, dim)
    top = 2 ** (bits - 1) - 1
    scale = padded.abs().amax(dim=(3, 4), keepdim=True).clamp(min=1e-12) / top
    ints = torch.round(padded / scale).clamp(-top, top)
    return ints.view(batch, heads, n * block, dim)[:, :, :length], scale.view(batch, heads, n)


@register("sale")
@dataclasses.dataclass
class SALE(Method):
    """Args:
        bits: integer width of the estimate (paper: 4; 8 also supported).
        block_size: tile size of the layout and of the quantization groups (64).
        threshold: minimum Relative Attention Score of a computed tile, in (0, 1].
    """

    bits: int = 4
    block_size: int = 64
    threshold: float = 1e-3

    causal_modes = (True,)
    any_lengths = False

    def __post_init__(self):
        _checks.choice_arg("bits", _checks.int_arg("bits", self.bits), (4, 8))
        self.check_positive_ints("block_size")
        _checks.fraction_arg("threshold", self.threshold)

    def relative_scores(self, q: Tensor, k: Tensor) -> Tensor:
        """`[B, Hq, nQ, nK]` Relative Attention Score of every tile (0 for tiles with no causal pair)."""
        check_qk(q, k)
        batch, heads, length, dim = q.shape
        if k.shape[2] != length:
            raise ValueError(f"sale selects for prefill: q_len ({length}) must equal k_len ({k.shape[2]})")
        block = self.block_size
        n = -(-length // block)
        q_int, q_scale = quantize_blocks(q, self.bits, block)
        k_int, k_scale = quantize_blocks(k, self.bits, block)
        # dequantized operands: the products equal the integer products times both scales
        q_deq = q_int * q_scale.repeat_interleave(block, dim=-1)[..., :length, None] / dim ** 0.5
        k_deq = expand_kv_heads(k_int * k_scale.repeat_interleave(block, dim=-1)[..., :length, None], heads)
        scores = torch.zeros(batch, heads, n, n, device=q.device)
        band_blocks = max(1, _BAND_ROWS // block)
        for first in range(0, n, band_blocks):
            stop = min(n, first + band_blocks)
            rows = slice(first * block, min(length, stop * block))
            logits = q_deq[:, :, rows] @ k_deq[:, :, :rows.stop].transpose(-1, -2)  # causal: no later keys
            future = torch.arange(rows.stop, device=q.device).view(1, -1) > \
                torch.arange(rows.start, rows.stop, device=q.device).view(-1, 1)
            logits = logits.masked_fill(future, float("-inf"))
            pad_r, pad_c = (stop - first) * block - (rows.stop - rows.start), stop * block - rows.stop
            # exp is monotone: the tile's largest relative weight comes from each row's largest logit in it
            row_tile_max = torch.nn.functional.pad(logits, (0, pad_c), value=float("-inf")) \
                .view(batch, heads, -1, stop, block).amax(-1)                    # [B, H, rows, stop]
            relative = torch.exp(row_tile_max - row_tile_max.amax(-1, keepdim=True))
            relative = torch.nn.functional.pad(relative, (0, 0, 0, pad_r))
            scores[:, :, first:stop, :stop] = relative.view(batch, heads, stop - first, block, stop).amax(3)
        return scores

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        scores = self.relative_scores(q, k)
        n = scores.shape[-1]
        keep = scores >= self.threshold
        keep[..., :, 0] = True
        keep |= torch.eye(n, dtype=torch.bool, device=q.device)
        return BlockLayout.from_dense(keep, q_len=q.shape[2], k_len=k.shape[2], block_q=self.block_size,
                                      block_k=self.block_size, causal=True)
