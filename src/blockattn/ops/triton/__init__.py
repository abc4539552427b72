"""Triton block-sparse attention for GPUs (forward and backward); runs on CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import os


def available(device=None) -> str:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"unavailable: triton is not installed ({error})"
    import torch
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "available"
    if not torch.cuda.is_available():
        return "unavailable: no CUDA GPU (set TRITON_INTERPRET=1 to run the kernel on the CPU interpreter)"
    if device is not None and device.type != "cuda":
        return f"unavailable on {device.type}: the triton backend takes CUDA tensors"
    return "available"


def run(q, k, v, layout, *, scale):
    raise NotImplementedError("the Triton kernel is being written")
