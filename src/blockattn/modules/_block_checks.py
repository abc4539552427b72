"""Boundary checks shared by the vision attention blocks (PSA, PAT, NiNformer, OverLoCK, ...)."""
from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_tensor(name: str, x, dims: int, shape_doc: str, **sizes: int) -> Tensor:
    """`x` is a floating tensor with `dims` dims; `sizes` maps a dim index (as `d<i>`) to its expected size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, bfloat16, float16), got {x.dtype}")
    if x.dim() != dims or any(x.shape[int(key[1:])] != size for key, size in sizes.items()):
        raise ValueError(f"{name} must have shape {shape_doc}, got {list(x.shape)}")
    return x


def check_image(name: str, x, channels: int) -> Tensor:
    """A channels-first image batch `[B, C, H, W]` with `C == channels`."""
    return check_tensor(name, x, 4, f"[B, C={channels}, H, W]", d1=channels)


def check_same_device_dtype(module: torch.nn.Module, name: str, x: Tensor) -> None:
    param = next(module.parameters(), None)
    if param is None:
        return
    if x.device != param.device:
        raise ValueError(f"{name} is on {x.device} but the module's parameters are on {param.device}")
    if x.dtype != param.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {param.dtype}")
