"""Backend registry: which backends exist, which can run a given call, and which `auto` picks.

Every backend module exposes `available(device=None) -> str` ("available" or why not, for the machine),
`can_run(q, k, v, layout) -> str` (the same for one call: dtype, device, tile shape) and
`run(q, k, v, layout, *, scale) -> (out, lse)`.
"""
from __future__ import annotations

import importlib
import os

import torch

_BACKENDS = {
    "reference": "blockattn.ops.reference",
    "torch": "blockattn.ops.torch_blocks",
    "cpu": "blockattn.ops.cpu",
    "triton": "blockattn.ops.triton",
    "flex": "blockattn.ops.flex",
}
# `auto` takes the first of these that can run the call; torch runs anywhere
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}


def names() -> list[str]:
    return list(_BACKENDS)


def module(name: str):
    return importlib.import_module(_BACKENDS[name])


def status(name: str, device: torch.device | None = None) -> str:
    try:
        backend = module(name)
    except Exception as error:  # a backend that cannot even be imported is unavailable, not fatal
        return f"unavailable: {type(error).__name__}: {error}"
    return backend.available(device)  # a misconfigured switch (BLOCKATTN_CPU_ISA) raises: never silent


def can_run(name: str, q, k, v, layout) -> str:
    """"available" when backend `name` can compute this call, else the reason."""
    reason = status(name, q.device)
    return module(name).can_run(q, k, v, layout) if reason == "available" else reason


def backends() -> dict[str, str]:
    """Backend name -> "available" or the reason it is not (on this machine's default device)."""
    return {name: status(name) for name in _BACKENDS}


def _forced() -> str | None:
    forced = os.environ.get("BLOCKATTN_BACKEND")
    if forced and forced not in _BACKENDS:
        raise ValueError(f"BLOCKATTN_BACKEND={forced!r} is not a backend; expected one of {names()}")
    return forced or None


def choose(device: torch.device) -> str:
    """The backend `auto` prefers on `device` before seeing a call (for reports and benchmarks):
    the documented switch `BLOCKATTN_BACKEND`, else the first available of the device's order."""
    forced = _forced()
    if forced:
        return forced
    for name in _AUTO_ORDER.get(torch.device(device).type, ()):
        if status(name, torch.device(device)) == "available":
            return name
    return "torch"


def choose_for(q, k, v, layout) -> str:
    """`auto` for one call: `BLOCKATTN_BACKEND` if set, else the first backend of the device's order
    that can run it (e.g. on CUDA, float64 or a 48-token block falls through Triton to torch)."""
    forced = _forced()
    if forced:
        return forced
    for name in _AUTO_ORDER.get(q.device.type, ()):
        if can_run(name, q, k, v, layout) == "available":
            return name
    return "torch"


def capable(q, k, v, layout) -> list[str]:
    """Every backend that can run this call (for error messages)."""
    return [name for name in _BACKENDS if can_run(name, q, k, v, layout) == "available"]


def dtype_reason(q, supported: tuple, backend: str) -> str:
    """`can_run`'s answer for a dtype check: "available" or a reason naming the dtype."""
    if q.dtype in supported:
        return "available"
    names_ = ", ".join(str(d).replace("torch.", "") for d in supported)
    return f"dtype {str(q.dtype).replace('torch.', '')} is not supported by the {backend} backend (it runs {names_})"
