"""Adapter to torch FlexAttention: the same layout as a `BlockMask` (peer backend and benchmark baseline)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from blockattn.layout import BlockLayout, _block_lists


def _full_tile_flags(layout: BlockLayout) -> Tensor:
    """bool `[B|1, H|1, nQ, maxK]`: listed tiles that need no token-level mask. Tiles that cross the
    end of the sequence are partial here: Flex applies no bounds check inside full blocks."""
    b, h, qb, kb = layout.listed_tiles()
    full = torch.zeros(layout.kv_indices.shape, dtype=torch.bool, device=layout.device)
    if len(b):
        masks = layout.tile_token_masks(b, h, qb, kb)
        valid = torch.arange(layout.max_blocks, device=layout.device) < layout.kv_counts.unsqueeze(-1)
        full[valid] = masks.flatten(1).all(1)
    return full


def layout_to_block_mask(layout: BlockLayout):
    from torch.nn.attention.flex_attention import BlockMask

    full = _full_tile_flags(layout)
    dense = layout.to_dense()
    ids = torch.where(full, layout.kv_indices, -1)
    full_dense = torch.zeros_like(dense)
    full_dense.view(-1, dense.shape[-1]).scatter_(
        1, torch.where(ids >= 0, ids, 0).long().view(-1, ids.shape[-1]), (ids >= 0).view(-1, ids.shape[-1]))
    partial_counts, partial_indices = _block_lists(dense & ~full_dense)
    full_counts, full_indices = _block_lists(full_dense)
    mask_mod = _layout_mask_mod(layout)
    # FlexAttention expects index tensors as wide as the number of key blocks
    width = layout.num_k_blocks
    partial_indices = torch.nn.functional.pad(partial_indices.clamp(min=0), (0, width - partial_indices.shape[-1]))
    full_indices = torch.nn.functional.pad(full_indices.clamp(min=0), (0, width - full_indices.shape[-1]))
    return BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices,
        BLOCK_SIZE=(layout.block_q, layout.block_k), mask_mod=mask_mod, seq_lengths=(layout.q_len, layout.k_len))


def _layout_mask_mod(layout: BlockLayout):
    """mask_mod reproducing the layout's whole token mask. FlexAttention treats the mask_mod as the
    definition (its eager path ignores block sparsity), so tile membership is part of it."""
    offset, causal, window = layout.offset, layout.causal, layout.window
    q_len, k_len = layout.q_len, layout.k_len
    # (b, h, q_block, k_block) -> index into `tile_masks`: a per-layout explicit mask, or one of two
    # constant tiles appended at the end (all allowed for listed tiles, none for unlisted ones)
    explicit = layout.tile_masks if layout.tile_masks is not None else \
        torch.zeros(0, layout.block_q, layout.block_k, dtype=torch.bool, device=layout.device)
    allow_all, allow_none = explicit.shape[0], explicit.shape[0] + 1
    tile_masks = torch.cat([explicit, explicit.new_ones(1, layout.block_q, layout.block_k),
                            explicit.new_zeros(1, layout.block_q, layout.block_k)])
    table = torch.full((layout.batch, layout.heads, layout.num_q_blocks, layout.num_k_blocks), allow_none,
                       dtype=torch.int64, device=layout.device)
    b, h, qb, slot = (torch.arange(layout.max_blocks, device=layout.device)
                      < layout.kv_counts.unsqueeze(-1)).nonzero(as_tuple=True)
    ids = torch.full_like(b, allow_all)
    if layout.tile_mask_ids is not None:
        own = layout.tile_mask_ids[b, h, qb, slot].long()
        ids = torch.where(own >= 0, own, ids)
    table[b, h, qb, layout.kv_indices[b, h, qb, slot].long()] = ids
    bq, bk = layout.block_q, layout.block_k
    b_last, h_last = layout.batch - 1, layout.heads - 1
    n_q_last, n_k_last = layout.num_q_blocks - 1, layout.num_k_blocks - 1

    def mask_mod(b, h, q_idx, kv_idx):
        aligned = q_idx + offset
        keep = (q_idx < q_len) & (kv_idx < k_len)
        if causal:
            keep = keep & (kv_idx <= aligned)
        if window is not None:
            keep = keep & (kv_idx >= aligned - window[0]) & (kv_idx <= aligned + window[1])
        tile = table[torch.clamp(b, max=b_last), torch.clamp(h, max=h_last),
                     torch.clamp(q_idx // bq, max=n_q_last), torch.clamp(kv_idx // bk, max=n_k_last)]
        return keep & tile_masks[tile, q_idx % bq, kv_idx % bk]

    return mask_mod


def layout_from_block_mask(block_mask, *, allow_empty_rows: bool = False) -> BlockLayout:
    """Partial tiles are evaluated through the BlockMask's `mask_mod` and kept as explicit masks."""
    from blockattn.layout import _layout_from_tile_masks, _tile_bounds

    block_q, block_k = block_mask.BLOCK_SIZE
    q_len, k_len = block_mask.seq_lengths
    template_dense = block_mask.to_dense().bool()  # [B, H, nQ, nK] (partial | full)
    n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
    template_dense = template_dense[..., :n_q, :n_k]
    counts, indices = _block_lists(template_dense)
    template = BlockLayout(counts, indices, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                           allow_empty_rows=True)
    tb, th, tq, tk = template.listed_tiles()
    masks = _tile_bounds(tq, tk, q_len, k_len, block_q, block_k)
    full = torch.zeros_like(template_dense)
    if block_mask.full_kv_num_blocks is not None:
        fc, fi = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
        valid = torch.arange(fi.shape[-1], device=fi.device) < fc.unsqueeze(-1)
        b, h, q, slot = valid.nonzero(as_tuple=True)
        full[b, h, q, fi[b, h, q, slot].long()] = True
    partial = ~full[tb, th, tq, tk]
    if partial.any():
        rows = tq[partial].view(-1, 1, 1) * block_q + torch.arange(block_q).view(1, -1, 1)
        cols = tk[partial].view(-1, 1, 1) * block_k + torch.arange(block_k).view(1, 1, -1)
        keep = block_mask.mask_mod(tb[partial].view(-1, 1, 1), th[partial].view(-1, 1, 1), rows, cols)
        masks[partial] &= keep.expand_as(masks[partial])
    return _layout_from_tile_masks(template, (tb, th, tq, tk), masks, allow_empty_rows=allow_empty_rows)


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, scale: float, compiled: bool | None = None,
                   block_mask=None):
    """`(out, lse)` through FlexAttention.

    `compiled=None` compiles on CUDA and runs eagerly on CPU: torch.compile's CPU FlexAttention
    supports inference only and cannot return the lse this contract needs, so the CPU path is the
    eager (exact, but dense-memory) one, and torch has no FlexAttention backward on CPU at all.
    Benchmarks time compiled inference directly through `compiled_flex_attention()`.
    """
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    if compiled is None:
        compiled = q.device.type == "cuda"
    block_mask = layout_to_block_mask(layout.to(q.device)) if block_mask is None else block_mask
    fn = compiled_flex_attention() if compiled else eager_flex
    out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                  return_lse=True)
    # FlexAttention reports empty rows with lse = -inf and zero output, as our contract says
    return out, lse.float()


def available(device=None) -> str:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as error:
        return f"unavailable: torch has no FlexAttention ({error})"
    return "available"


def can_run(q, k, v, layout) -> str:
    from blockattn.ops.dispatch import dtype_reason
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "unavailable: torch has no FlexAttention backward on CPU"
    return dtype_reason(q, (torch.float64, torch.float32, torch.bfloat16, torch.float16), "flex")


def run(q, k, v, layout, *, scale):
    return flex_attention(q, k, v, layout, scale=scale)
