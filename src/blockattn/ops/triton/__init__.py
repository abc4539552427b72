"""Triton block-sparse attention for GPUs (forward and backward); runs on CPU under TRITON_INTERPRET=1.

The kernel's tile is the layout's block, so `block_q` and `block_k` must be powers of two >= 16
(Triton's `tl.dot` shape rule); head dims are padded to a power of two inside the kernel.
float32 matmuls use IEEE precision (no TF32) so results match the float64 reference.
A tile shape that does not fit the GPU's shared memory even with one pipeline stage (on an H200:
D=256 with 128x128 blocks in the dK/dV pass) raises Triton's OutOfResources; use 64-sized blocks there.
"""
from __future__ import annotations

import os

import torch

from blockattn.ops._autograd import LayoutAttention


def available(device=None) -> str:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"unavailable: triton is not installed ({error})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "available"
    if not torch.cuda.is_available():
        return "unavailable: no CUDA GPU (set TRITON_INTERPRET=1 to run the kernel on the CPU interpreter)"
    if device is not None and device.type != "cuda":
        return f"unavailable on {device.type}: the triton backend takes CUDA tensors"
    return "available"


def can_run(q, k, v, layout) -> str:
    from blockattn.ops.dispatch import dtype_reason
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"unavailable on {q.device.type}: the triton backend takes CUDA tensors"
    reason = dtype_reason(q, (torch.float32, torch.bfloat16, torch.float16), "triton")
    if reason != "available":
        return reason
    for name, size in (("block_q", layout.block_q), ("block_k", layout.block_k)):
        if size < 16 or size & (size - 1):
            return f"the triton backend needs {name} to be a power of two >= 16, got {size}"
    return "available"


def _launch_args(q, k, layout, scale):
    left, right = layout.window if layout.window is not None else (0, 0)
    return dict(heads_q=q.shape[1], heads_kv=k.shape[1], layout_b=layout.batch, layout_h=layout.heads,
                q_len=q.shape[2], k_len=k.shape[2], offset=layout.offset, scale=scale, left=left, right=right,
                D=q.shape[3], BLOCK_D=max(16, 1 << (q.shape[3] - 1).bit_length()), BLOCK_Q=layout.block_q,
                BLOCK_K=layout.block_k, CAUSAL=layout.causal, WINDOW=layout.window is not None,
                HAS_MASKS=layout.tile_masks is not None, WORD=_word_bits(layout),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


# pipeline depth that fit in shared memory, per kernel and tile shape, learnt on the first launch
_STAGES_THAT_FIT: dict = {}


def _launch(kernel, grid, *args, **kwargs):
    """Launch with 8 warps for big tiles (a 128x128 fp32 accumulator does not fit 4 warps' registers)
    and double-buffered K/V loads; a GPU whose shared memory cannot hold that gets one stage less."""
    from triton.runtime.errors import OutOfResources

    block_q, block_k, block_d = kwargs["BLOCK_Q"], kwargs["BLOCK_K"], kwargs["BLOCK_D"]
    big = block_q * block_k >= 128 * 64 or max(block_q, block_k) * block_d >= 128 * 128
    warps = 8 if big else 4
    key = (kernel, block_q, block_k, block_d, kwargs["PRECISION"])
    stages = _STAGES_THAT_FIT.get(key, 2)
    while True:
        try:
            kernel[grid](*args, num_warps=warps, num_stages=stages, **kwargs)
            _STAGES_THAT_FIT[key] = stages
            return
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1


def _word_bits(layout) -> int:
    return min(layout.block_k, 32)


def _masks(layout, device):
    """(tile_mask_ids, tile masks packed `_word_bits` bits per int32 word: [M, block_q, block_k / word])."""
    if layout.tile_masks is None:
        empty = torch.zeros(1, dtype=torch.int32, device=device)
        return empty, empty
    word = _word_bits(layout)
    masks = layout.tile_masks.to(device)
    bits = masks.view(masks.shape[0], layout.block_q, layout.block_k // word, word).to(torch.int64)
    packed = (bits << torch.arange(word, device=device)).sum(-1)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)  # two's complement
    return layout.tile_mask_ids.to(device), packed.contiguous()


def _forward(q, k, v, layout, scale):
    from blockattn.ops.triton.kernels import forward_kernel

    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    mask_ids, tile_masks = _masks(layout, q.device)
    args = _launch_args(q, k, layout, scale)
    grid = (layout.num_q_blocks, q.shape[0] * q.shape[1])
    _launch(forward_kernel, grid, q, k, v, out, lse, layout.kv_counts.to(q.device),
            layout.kv_indices.to(q.device), mask_ids, tile_masks, n_q=layout.num_q_blocks,
            max_k=layout.max_blocks, **args)
    return out, lse


def _backward(q, k, v, lse, grad_out, delta, layout, scale):
    from blockattn.ops.triton.kernels import backward_dkdv_kernel, backward_dq_kernel

    args = _launch_args(q, k, layout, scale)
    mask_ids, tile_masks = _masks(layout, q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    q_counts, q_indices, q_mask_ids = layout.transpose()
    q_mask_ids = mask_ids if q_mask_ids is None else q_mask_ids.to(q.device)
    _launch(
        backward_dkdv_kernel, (layout.num_k_blocks, k.shape[0] * k.shape[1]),
        q, k, v, grad_out, lse, delta, dk, dv, q_counts.to(q.device), q_indices.to(q.device), q_mask_ids,
        tile_masks, n_k=layout.num_k_blocks, max_q=q_indices.shape[3], **args)
    _launch(
        backward_dq_kernel, (layout.num_q_blocks, q.shape[0] * q.shape[1]),
        q, k, v, grad_out, lse, delta, dq, layout.kv_counts.to(q.device), layout.kv_indices.to(q.device),
        mask_ids, tile_masks, n_q=layout.num_q_blocks, max_k=layout.max_blocks, **args)
    return dq, dk, dv


def run(q, k, v, layout, *, scale):
    reason = can_run(q, k, v, layout)
    if reason != "available":
        raise (TypeError if reason.startswith("dtype") else ValueError)(reason)
    if q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # the CPU interpreter reads bfloat16 as raw 16-bit integers (numpy has no bfloat16), so under it
        # bfloat16 runs in float32; on a GPU the kernel takes bfloat16 natively
        out, lse = run(q.float(), k.float(), v.float(), layout, scale=scale)
        return out.to(torch.bfloat16), lse
    q, k, v = (t.contiguous() for t in (q, k, v))
    return LayoutAttention.apply(q, k, v, layout, scale, _forward, _backward)
