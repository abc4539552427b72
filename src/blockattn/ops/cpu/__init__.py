"""Compiled C++ block-sparse attention for CPUs (built by setup.py against the installed torch).

float32 runs in the kernel; bfloat16 runs natively on CPUs with AVX512-BF16 (forward: q/k/v stay
bf16, both products on vdpbf16ps with fp32 accumulation, softmax in fp32; backward in fp32), and
elsewhere bfloat16/float16 are converted to float32 around the kernel; float64 is not taken (`can_run`
says so, and `auto` gives it to the portable torch backend, whose arithmetic is exact in float64).

Forward and backward use AVX-512 micro-kernels where the CPU has AVX-512 (F/BW/VL/DQ) and the AVX2 +
MKL path elsewhere; `isa()` says which. The documented switch BLOCKATTN_CPU_ISA=avx2 forces the AVX2
path (checked at the backend's first use: an unknown or unsupported value is a ValueError).
"""
from __future__ import annotations

import functools
import os

import torch

from blockattn.layout import BlockLayout
from blockattn.ops._autograd import LayoutAttention

try:
    from blockattn.ops.cpu import _kernel
    _IMPORT_ERROR = None
except ImportError as error:  # not built: the portable backend takes over
    _kernel = None
    _IMPORT_ERROR = error

ISAS = ("avx512", "avx2")


def _apply_isa_switch() -> None:
    """BLOCKATTN_CPU_ISA (documented switch) forces a forward path; an unknown value, or one this CPU
    cannot run, is an error at the first use of the backend rather than a silent fallback."""
    wanted = os.environ.get("BLOCKATTN_CPU_ISA")
    if not wanted or _kernel is None or wanted == _kernel.isa():
        return
    if wanted not in ISAS:
        raise ValueError(f"BLOCKATTN_CPU_ISA={wanted!r} is not a CPU path; expected one of {list(ISAS)}")
    try:
        _kernel.set_isa(wanted)
    except RuntimeError as error:
        raise ValueError(f"BLOCKATTN_CPU_ISA={wanted!r} cannot run on this CPU: {error}") from None


def isa() -> str | None:
    """The implementation in use, "avx512" or "avx2" (None if the kernel is not built)."""
    return _kernel.isa() if _kernel is not None else None


def paths() -> dict[str, str]:
    """Per input dtype, the path the cpu backend computes it on (for `blockattn info`)."""
    if _kernel is None:
        return {}
    _apply_isa_switch()
    fp32 = isa()
    converted = f"{fp32} (converted to fp32 around the kernel)"
    bf16 = ("avx512-bf16 forward (even head dim and block_k; backward avx512 in fp32)" if _bf16_units()
            else converted)
    return {"fp32": fp32, "bf16": bf16, "fp16": converted, "fp64": "not taken: auto runs it on torch"}


def available(device=None) -> str:
    _apply_isa_switch()
    if _kernel is None:
        return f"unavailable: compiled kernel not built or not importable ({_IMPORT_ERROR}); reinstall with ./setup.sh"
    if device is not None and device.type != "cpu":
        return f"unavailable on {device.type}: the cpu backend takes CPU tensors"
    return _cpu_status()


@functools.lru_cache(maxsize=1)
def _cpu_status() -> str:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        # the kernel is built with AVX2/FMA intrinsics; running it elsewhere would be an illegal instruction
        return f"unavailable: this CPU lacks AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    return "available"


def can_run(q, k, v, layout) -> str:
    from blockattn.ops.dispatch import dtype_reason
    return dtype_reason(q, (torch.float32, torch.bfloat16, torch.float16), "cpu")


def _rule(layout: BlockLayout) -> dict:
    left, right = layout.window if layout.window is not None else (-1, -1)
    return dict(block_q=layout.block_q, block_k=layout.block_k, causal=layout.causal, left=left, right=right)


def _tile_masks(layout: BlockLayout) -> torch.Tensor:
    if layout.tile_masks is None:
        return torch.empty(0, dtype=torch.uint8)
    return layout.tile_masks.contiguous().view(torch.uint8)  # same bytes, no copy


def _new_buffer(like: torch.Tensor, shape=None) -> torch.Tensor:
    """Uninitialised float32 buffer the kernel fills completely (tests replace this with a NaN-filled
    one to catch elements the kernel fails to write)."""
    return torch.empty(like.shape if shape is None else shape, dtype=torch.float32)


def _forward(q, k, v, layout, scale):
    mask_ids = layout.tile_mask_ids.contiguous() if layout.tile_mask_ids is not None else \
        torch.empty(0, dtype=torch.int32)
    rule = _rule(layout)
    out, lse = _new_buffer(q), _new_buffer(q, q.shape[:3])
    _kernel.forward(q, k, v, layout.kv_counts.contiguous(), layout.kv_indices.contiguous(), mask_ids,
                    _tile_masks(layout), rule["block_q"], rule["block_k"], rule["causal"], rule["left"],
                    rule["right"], scale, out, lse)
    return out, lse


def _backward(q, k, v, lse, grad_out, delta, layout, scale):
    q_counts, q_indices, q_mask_ids = layout.transpose()
    empty = torch.empty(0, dtype=torch.int32)
    rule = _rule(layout)
    dq, dk, dv = _new_buffer(q), _new_buffer(k), _new_buffer(v)
    _kernel.backward(q, k, v, grad_out.float().contiguous(), lse, delta, q_counts.contiguous(),
                     q_indices.contiguous(), empty if q_mask_ids is None else q_mask_ids,
                     layout.kv_counts.contiguous(), layout.kv_indices.contiguous(),
                     empty if layout.tile_mask_ids is None else layout.tile_mask_ids.contiguous(),
                     _tile_masks(layout), rule["block_q"], rule["block_k"], rule["causal"], rule["left"],
                     rule["right"], scale, dq, dk, dv)
    return dq, dk, dv


def _bf16_units() -> bool:
    """Whether the AVX512-BF16 forward can run: the CPU has it and the AVX-512 path is in use."""
    return isa() == "avx512" and _kernel.has_avx512_bf16()


def _native_bf16(q, layout) -> bool:
    """bf16 runs on the AVX512-BF16 forward where it can, with an even head dim and key block (the dot
    products take pairs); otherwise it is converted to fp32."""
    return q.dtype == torch.bfloat16 and _bf16_units() and q.shape[3] % 2 == 0 and layout.block_k % 2 == 0


def _key_pairs(v: torch.Tensor) -> torch.Tensor:
    """`[B, H, Lk, D]` -> `[B, H, ceil(Lk/2), D, 2]`: values as pairs of consecutive keys (VNNI order)."""
    if v.shape[2] % 2:
        v = torch.nn.functional.pad(v, (0, 0, 0, 1))
    return v.unflatten(2, (-1, 2)).transpose(-1, -2).contiguous()


def _forward_bf16(q, k, v, layout, scale):
    mask_ids = layout.tile_mask_ids.contiguous() if layout.tile_mask_ids is not None else \
        torch.empty(0, dtype=torch.int32)
    rule = _rule(layout)
    out, lse = _new_buffer(q), _new_buffer(q, q.shape[:3])
    _kernel.forward_bf16(q, k, _key_pairs(v), layout.kv_counts.contiguous(), layout.kv_indices.contiguous(),
                         mask_ids, _tile_masks(layout), rule["block_q"], rule["block_k"], rule["causal"],
                         rule["left"], rule["right"], scale, out, lse)
    return out, lse


def _backward_in_fp32(q, k, v, lse, grad_out, delta, layout, scale):
    dq, dk, dv = _backward(q.float(), k.float(), v.float(), lse, grad_out, delta, layout, scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def run(q, k, v, layout: BlockLayout, *, scale):
    dtype = q.dtype
    if _native_bf16(q, layout):
        # q/k/v stay bf16 (saved as such for the backward, which runs in fp32); out is fp32 until returned
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, lse = LayoutAttention.apply(q, k, v, layout, scale, _forward_bf16, _backward_in_fp32)
        return out.to(dtype), lse
    # the kernel reads plain contiguous float32; for float32 inputs these are no-op views
    q32, k32, v32 = (t.float().contiguous() for t in (q, k, v))
    out, lse = LayoutAttention.apply(q32, k32, v32, layout, scale, _forward, _backward)
    return out.to(dtype), lse
