"""PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual
Generation Models (Zhao et al., 2025).

Rule: tokens lie on a `(T, H, W)` grid in row-major order. Visual attention is local along some
axis, which a row-major order scatters into stripes; reading the grid in another axis order (one of
the 6 permutations of T, H, W) gathers it into blocks. Per (batch, head) PARO takes the
permutation whose permuted attention is most block-concentrated: for `sample_blocks` evenly spaced
query blocks of the permuted sequence, the share of their exact attention mass that falls in their
best `density` fraction of key blocks (the paper picks the permutation per head offline from
calibration data by such a block-sparsity metric). Then, on the permuted tokens, each query block
keeps its `density` fraction of key blocks with the largest estimated mass (the softmax of the
block's mean query against every key, summed per key block) plus its own (diagonal) block.
`quant_bits` (8 or 4) estimates with per-block symmetric low-bit q and k, the paper's low-bit QK.

Two ways to use it: `attend(q, k, v, grid=...)` permutes q/k/v, runs the engine on the block layout
of the permuted tokens and undoes the permutation; `select(q, k, grid=...)` returns the same token
mask in the original order (tiles carry explicit masks), so `sparse_attention` works unchanged.
Without `grid` the sequence is one axis and the permutation is the identity. `causal=True` (LLM
use) removes future keys in the original order; `attend` then uses the `select` layout.

Check done: permutation choice, selection and the token mask equal a float64 loop implementation
of this rule in tests/methods/test_paro.py, and on a synthetic input local along T the chosen order
is more block-diagonal than the identity. Not run side by side with the official code
(thu-nics/PAROAttention), which calibrates offline on CUDA.

Causality (`causal=True`): the block mask is block-granular (a query block's mean query scores
the keys) and the permutation is chosen from sampled blocks of the whole prompt, so in prefill
later tokens can change earlier tokens' key sets (never letting them see a later key); with a
1-D sequence the permutation is the identity and only the first effect remains.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

import blockattn
from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn.methods._labels import label_layout
from blockattn import _checks
from blockattn._checks import check_qk, int_tuple_arg
from blockattn.methods._select import expand_kv_heads
from blockattn.methods.base import Method

#: the 6 axis orders, outermost axis first ("thw" is the row-major identity)
ORDERS = ("thw", "twh", "htw", "hwt", "wth", "wht")


def order_indices(grid, order: str, device=None) -> Tensor:
    """`[L]` original token index at each position of the sequence read in axis `order`."""
    ids = torch.arange(math.prod(grid), device=device).view(*grid)
    return ids.permute(*("thw".index(axis) for axis in order)).reshape(-1)


def quantize(x: Tensor, bits: int, block: int) -> Tensor:
    """Per-block symmetric fake quantization of `[..., L, D]` to `bits` (dequantized values)."""
    length = x.shape[-2]
    n = -(-length // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, n * block - length))
    blocks = padded.view(*x.shape[:-2], n, block * x.shape[-1])
    levels = 2 ** (bits - 1) - 1
    step = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12) / levels
    return ((blocks / step).round().clamp(-levels, levels) * step).view_as(padded)[..., :length, :]


@register("paro")
@dataclasses.dataclass
class PAROAttention(Method):
    """Args:
        density: fraction of key blocks each query block keeps, in (0, 1]. Paper evaluates 0.5, 0.3, 0.2.
        block_size: block (and tile) size in tokens. Paper: 64.
        sample_blocks: permuted query blocks whose exact attention scores each permutation.
        quant_bits: None, 8 or 4: estimate block importance with low-bit q and k.
        causal: LLM use (no future keys in the original order).
    """

    within_block_lookahead = True  # a query block's mean query picks its key blocks
    density: float = 0.5
    block_size: int = 64
    sample_blocks: int = 8
    quant_bits: int | None = None
    causal: bool = False

    grid_dims = 3
    any_lengths = False

    def __post_init__(self):
        _checks.fraction_arg("density", self.density)
        self.check_positive_ints("block_size", "sample_blocks")
        if self.quant_bits is not None:
            _checks.choice_arg("quant_bits", _checks.int_arg("quant_bits", self.quant_bits), (None, 8, 4))
        _checks.bool_arg("causal", self.causal)

    def _grid(self, q: Tensor, k: Tensor, grid):
        check_qk(q, k)
        length = q.shape[2]
        if k.shape[2] != length:
            raise ValueError(f"paro is self-attention: q_len ({length}) must equal k_len ({k.shape[2]})")
        if grid is None:
            return (length, 1, 1)
        grid = int_tuple_arg("grid", grid, 3)
        if math.prod(grid) != length:
            raise ValueError(f"grid {tuple(grid)} has {math.prod(grid)} tokens but the sequence has {length}")
        return tuple(grid)

    def _keep(self, allowed_count: Tensor) -> Tensor:
        return (allowed_count * self.density).ceil().clamp(min=1).long()

    def concentration(self, q: Tensor, k: Tensor, order: Tensor) -> Tensor:
        """`[B, Hq]`: mean share of the sampled permuted query blocks' attention mass inside their best
        `density` fraction of key blocks, for the token order `order [L]`."""
        batch, heads, length, dim = q.shape
        block = self.block_size
        n_blocks = -(-length // block)
        keys = expand_kv_heads(k.float(), heads)
        position = torch.empty(length, dtype=torch.long, device=q.device)
        position[order] = torch.arange(length, device=q.device)
        key_block = position // block
        # the sampled blocks are loop bounds: they stay on the CPU
        sampled = torch.linspace(0, n_blocks - 1, min(self.sample_blocks, n_blocks)).round().long().unique()
        total = torch.zeros(batch, heads, device=q.device)
        for qb in sampled.tolist():
            rows = order[qb * block:(qb + 1) * block]
            scores = q[:, :, rows].float() @ keys.transpose(-1, -2) * dim ** -0.5
            allowed = torch.ones(len(rows), length, dtype=torch.bool, device=q.device)
            if self.causal:
                allowed = torch.arange(length, device=q.device).view(1, -1) <= rows.view(-1, 1)
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            mass = torch.zeros(batch, heads, len(rows), n_blocks, device=q.device).index_add_(3, key_block, probs).mean(2)
            candidates = torch.zeros(n_blocks, dtype=torch.bool, device=q.device)
            candidates[key_block[allowed.any(0)]] = True
            keep = int(self._keep(candidates.sum()))
            total += mass.topk(keep, dim=-1).values.sum(-1)
        return total / len(sampled)

    def permutation(self, q: Tensor, k: Tensor, grid=None) -> tuple[Tensor, list]:
        """(order `[B, Hq, L]`: the original token index at each permuted position, and the chosen
        axis-order names `[B][Hq]`). With a one-axis grid every order is the identity."""
        grid = self._grid(q, k, grid)
        batch, heads, length, _ = q.shape
        candidates = [o for o in ORDERS if o == "thw" or sum(n > 1 for n in grid) > 1]
        # orders that read the grid identically (axes of size 1) are the same permutation: keep the first
        unique, seen = [], set()
        for name in candidates:
            key = tuple(order_indices(grid, name).tolist())
            if key not in seen:
                seen.add(key)
                unique.append(name)
        if len(unique) == 1:
            order = torch.arange(length, device=q.device).expand(batch, heads, length)
            return order, [["thw"] * heads for _ in range(batch)]
        scores = torch.stack([self.concentration(q, k, order_indices(grid, name, q.device)) for name in unique], -1)
        best = scores.argmax(-1)  # first order wins ties, so the identity is kept unless another is better
        orders = torch.stack([order_indices(grid, name, q.device) for name in unique])
        return orders[best], [[unique[int(i)] for i in row] for row in best]

    def block_mask(self, q: Tensor, k: Tensor, order: Tensor) -> Tensor:
        """bool `[B, Hq, nQ, nK]`: the key blocks each query block keeps, in the permuted order `order [B, Hq, L]`."""
        batch, heads, length, dim = q.shape
        block = self.block_size
        n_blocks = -(-length // block)
        keys = expand_kv_heads(k.float(), heads)
        queries = q.float()
        if self.quant_bits:
            queries, keys = quantize(queries, self.quant_bits, block), quantize(keys, self.quant_bits, block)
        index = order.unsqueeze(-1).expand(-1, -1, -1, dim)
        q_perm, k_perm = queries.gather(2, index), keys.gather(2, index)
        pad = n_blocks * block - length
        sizes = torch.nn.functional.pad(torch.ones(length, device=q.device), (0, pad)).view(n_blocks, block).sum(-1)
        pooled = torch.nn.functional.pad(q_perm, (0, 0, 0, pad)).view(batch, heads, n_blocks, block, dim).sum(3) \
            / sizes.view(1, 1, -1, 1)
        scores = pooled @ k_perm.transpose(-1, -2) * dim ** -0.5  # [B, H, nQ, L]
        if self.causal:
            # a key is a candidate when it precedes the block's last query in the original order
            last = torch.nn.functional.pad(order, (0, pad), value=-1).view(batch, heads, n_blocks, block).amax(-1)
            scores = scores.masked_fill(order.unsqueeze(2) > last.unsqueeze(-1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        key_block = (torch.arange(length, device=q.device) // block).expand(batch, heads, n_blocks, length)
        mass = torch.zeros(batch, heads, n_blocks, n_blocks, device=q.device).scatter_add_(3, key_block, probs)
        allowed = torch.zeros(batch, heads, n_blocks, n_blocks, device=q.device).scatter_add_(
            3, key_block, (scores > float("-inf")).float()) > 0
        diagonal = torch.eye(n_blocks, dtype=torch.bool, device=q.device).expand_as(allowed)
        keep = self._keep(allowed.sum(-1))
        # one ranking per row: the diagonal block first, then allowed blocks by mass; keep the first `keep`
        keyed = mass.masked_fill(~allowed, float("-inf")).masked_fill(diagonal, float("inf"))
        order = keyed.argsort(dim=-1, descending=True, stable=True)
        ranked = torch.arange(n_blocks, device=q.device).expand_as(order) < keep.unsqueeze(-1)
        return torch.zeros_like(allowed).scatter_(-1, order, ranked) & (allowed | diagonal)

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        """The selected token mask in the original token order, `[B, Hq]` heads."""
        order, _ = self.permutation(q, k, grid)
        blocks = self.block_mask(q, k, order)
        position = torch.empty_like(order).scatter_(2, order, torch.arange(q.shape[2], device=q.device).expand_as(order))
        labels = position // self.block_size
        return label_layout(labels, labels, blocks, block_q=self.block_size, block_k=self.block_size,
                            causal=self.causal)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grid=None, *, scale: float | None = None,
               backend: str = "auto") -> Tensor:
        """Attention over the PARO selection: permute q/k/v per head, attend over the block layout of
        the permuted tokens, undo the permutation. Returns `[B, Hq, L, D]` in the original order."""
        if self.causal:
            return blockattn.attention(q, k, v, self.select(q, k, grid=grid), scale=scale, backend=backend)
        order, _ = self.permutation(q, k, grid)
        blocks = self.block_mask(q, k, order)
        heads, length, dim = q.shape[1], q.shape[2], q.shape[3]
        index = order.unsqueeze(-1).expand(-1, -1, -1, dim)
        q_perm = q.gather(2, index)
        k_perm = expand_kv_heads(k, heads).gather(2, index)
        v_perm = expand_kv_heads(v, heads).gather(2, index)
        layout = BlockLayout.from_dense(blocks, q_len=length, k_len=length, block_q=self.block_size,
                                        block_k=self.block_size)
        out_perm = blockattn.attention(q_perm, k_perm, v_perm, layout, scale=scale, backend=backend)
        return torch.empty_like(out_perm).scatter_(2, index, out_perm)
