"""Boundary checks shared by every public entry point that takes q, k, v (or more attention tensors)."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_tensors(*named: tuple[str, object], dims: str = "[B, H, L, D]") -> None:
    """Each `(name, tensor)` is a 4-dim floating tensor; all share the first one's dtype and device."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims {dims}, got shape {list(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    (first, t0), rest = named[0], named[1:]
    for name, t in rest:
        if t.dtype != t0.dtype:
            raise TypeError(f"{name} must share {first}'s dtype {t0.dtype}, got {t.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{name} must be on {first}'s device {t0.device}, got {t.device}")


def check_qkv_tensors(q, k, v) -> None:
    """Each of q, k, v is a 4-dim `[B, H, L, D]` floating tensor; all share one dtype and device."""
    check_float_tensors(("q", q), ("k", k), ("v", v))


def check_causal_self_attention(q, k, v, scale, what: str) -> float:
    """q `[B, Hq, L, D]` and k, v `[B, Hkv, L, D]` (Hq % Hkv == 0) of one length, for a module `what` that is
    causal self-attention; returns the score scale (`D ** -0.5` unless given)."""
    check_qkv_tensors(q, k, v)
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected q [B, Hq, L, D] and k, v [B, Hkv, L, D] with Hq % Hkv == 0, got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{what} is causal self-attention: q and k must have the same length, got "
                         f"{q.shape[2]} and {k.shape[2]}")
    return q.shape[3] ** -0.5 if scale is None else float(scale)


# ---------------------------------------------------------------------------------- argument checks
# One rule everywhere: a wrong type raises TypeError, a wrong value ValueError; the message names the
# argument and says what was expected. Each returns the (normalised) value so callers can assign it.

def int_arg(name: str, value, *, minimum: int = 1) -> int:
    """An int (not a bool) that is at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def optional_int_arg(name: str, value, *, minimum: int = 1) -> int | None:
    """None, or an int of at least `minimum`."""
    return None if value is None else int_arg(name, value, minimum=minimum)


def number_arg(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A real number (int or float, not a bool) in the interval from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:  # value != value: NaN
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value


def fraction_arg(name: str, value) -> float:
    """A number in (0, 1]: a threshold, a density, a share of mass."""
    return number_arg(name, value, low=0.0, high=1.0, low_open=True)


def bool_arg(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def choice_arg(name: str, value, options) -> object:
    """One of `options` (compared with ==)."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def int_tuple_arg(name: str, value, length: int, *, minimum: int = 1) -> tuple[int, ...]:
    """A tuple or list of `length` ints, each at least `minimum`; returned as a tuple."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of {length} ints, got {type(value).__name__} {value!r}")
    if len(value) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(value)}: {tuple(value)!r}")
    return tuple(int_arg(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(value))


def check_qk(q, k) -> None:
    """What every block selector takes: q `[B, Hq, Lq, D]`, k `[B, Hkv, Lk, D]` on one device, same B and D,
    `Hq % Hkv == 0`."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, L, D], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.shape[2] < 1:
            raise ValueError(f"{name} must hold at least one token, got shape {list(t.shape)}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must share batch size and head dim")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})")
