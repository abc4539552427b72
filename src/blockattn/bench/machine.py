"""What machine a benchmark ran on, and its own peak: the CPU's model and the flags that decide which
kernels run, and a large GEMM of each dtype timed in the same run (the roof every row is a fraction of)."""
from __future__ import annotations

import functools
import platform

import torch

from blockattn.bench.timing import time_call

# flags that select a kernel path: AVX2/AVX-512 vector units, bf16/fp16 dot products, AMX tiles
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def _cpuinfo(field: str) -> str:
    """The first `field : value` line of /proc/cpuinfo ("" where there is none, e.g. off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset:
    return frozenset(_cpuinfo("flags").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_description() -> str:
    """e.g. "AMD EPYC (avx2 fma avx512f avx512_bf16)": the model and the kernel-relevant flags it has."""
    flags = [f for f in _FLAGS if f in cpu_flags()]
    return f"{cpu_model()} ({' '.join(flags) or 'no AVX2'})"


def native_dtypes() -> list[str]:
    """Dtypes this CPU has arithmetic units for: fp32 always; bf16 with AVX512-BF16 or AMX-BF16; fp16 with
    AVX512-FP16 or AMX-FP16 (elsewhere half precision is emulated and slower than fp32)."""
    flags = cpu_flags()
    names = ["fp32"]
    if flags & {"avx512_bf16", "amx_bf16"}:
        names.append("bf16")
    if flags & {"avx512_fp16", "amx_fp16"}:
        names.append("fp16")
    return names


def gemm_gflops(dtype: torch.dtype, *, size: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of one `size x size` matmul in `dtype` (torch's own BLAS / oneDNN path)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    ms = time_call(lambda: a @ b, repeats=repeats)
    return 2 * size ** 3 / ms / 1e6
