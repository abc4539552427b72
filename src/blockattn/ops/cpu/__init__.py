"""Compiled C++/OpenMP block-sparse attention for CPUs (built by setup.py against the installed torch)."""
from __future__ import annotations

try:
    from blockattn.ops.cpu import _kernel
    _IMPORT_ERROR = None
except ImportError as error:  # not built: the portable backend takes over
    _kernel = None
    _IMPORT_ERROR = error


def available(device=None) -> str:
    if _kernel is None:
        return f"unavailable: compiled kernel not built or not importable ({_IMPORT_ERROR}); reinstall with ./setup.sh"
    if device is not None and device.type != "cpu":
        return f"unavailable on {device.type}: the cpu backend takes CPU tensors"
    return "available"


def run(q, k, v, layout, *, scale):
    raise NotImplementedError("the compiled CPU kernel is being written")
