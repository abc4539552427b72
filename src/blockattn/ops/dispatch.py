"""Backend registry: which backends exist, whether each can run here, and which `auto` picks."""
from __future__ import annotations

import importlib
import os

import torch

# name -> module exposing `available() -> str` ("available" or why not) and `run(q, k, v, layout, *, scale)`
_BACKENDS = {
    "reference": "blockattn.ops.backend_reference",
    "torch": "blockattn.ops.backend_torch",
    "cpu": "blockattn.ops.cpu",
    "triton": "blockattn.ops.triton",
    "flex": "blockattn.ops.backend_flex",
}


def names() -> list[str]:
    return list(_BACKENDS)


def module(name: str):
    return importlib.import_module(_BACKENDS[name])


def status(name: str, device: torch.device | None = None) -> str:
    try:
        return module(name).available(device)
    except Exception as error:  # a backend that cannot even be imported is unavailable, not fatal
        return f"unavailable: {type(error).__name__}: {error}"


def backends() -> dict[str, str]:
    """Backend name -> "available" or the reason it is not (on this machine's default device)."""
    return {name: status(name) for name in _BACKENDS}


def choose(device: torch.device) -> str:
    """`auto`: Triton on CUDA, the compiled kernel on CPU, the portable path otherwise.
    The documented switch `BLOCKATTN_BACKEND` overrides it."""
    forced = os.environ.get("BLOCKATTN_BACKEND")
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"BLOCKATTN_BACKEND={forced!r} is not a backend; expected one of {names()}")
        return forced
    preferred = ["triton"] if device.type == "cuda" else ["cpu"] if device.type == "cpu" else []
    for name in preferred:
        if status(name, device) == "available":
            return name
    return "torch"
