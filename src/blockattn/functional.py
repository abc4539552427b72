"""The public entry points: `attention` (one layout, one engine) and `sparse_attention` (select, then attend)."""
from __future__ import annotations

from torch import Tensor

from blockattn._checks import check_qkv_tensors
from blockattn.layout import BlockLayout
from blockattn.ops import dispatch

MAX_HEAD_DIM = 256


def _check_inputs(q, k, v, layout, scale, backend):
    check_qkv_tensors(q, k, v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Lk, D], got {list(k.shape)} and {list(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be <= {MAX_HEAD_DIM}, got {q.shape[3]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}) for GQA/MQA")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if (layout.q_len, layout.k_len) != (q.shape[2], k.shape[2]):
        raise ValueError(f"layout was built for q_len={layout.q_len}, k_len={layout.k_len} but q has "
                         f"{q.shape[2]} and k has {k.shape[2]} tokens")
    if layout.batch not in (1, q.shape[0]):
        raise ValueError(f"layout batch dimension {layout.batch} does not broadcast to batch size {q.shape[0]}")
    if layout.heads not in (1, q.shape[1]):
        raise ValueError(f"layout head dimension {layout.heads} does not broadcast to {q.shape[1]} query heads")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if backend != "auto" and backend not in dispatch.names():
        raise ValueError(f"backend must be 'auto' or one of {dispatch.names()}, got {backend!r}")


def attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, scale: float | None = None,
              return_lse: bool = False, backend: str = "auto"):
    """Exact attention restricted to `layout`, computing only its tiles.

    Args:
        q: `[B, Hq, Lq, D]` queries.
        k, v: `[B, Hkv, Lk, D]` keys and values; `Hq % Hkv == 0` (GQA/MQA, never repeated in memory).
        layout: a `BlockLayout` built for `(Lq, Lk)`, broadcasting over batch and heads.
        scale: score scale; default `D ** -0.5`.
        return_lse: also return the natural-log sum of exponentials of the scaled scores,
            `[B, Hq, Lq]` float32 (`-inf` for rows that attend to nothing).
        backend: "auto" (the first backend that can run the call: Triton then torch on CUDA, the
            compiled kernel then torch on CPU, torch elsewhere), or one of "reference", "torch",
            "cpu", "triton", "flex". A backend that cannot run the call (dtype, device, tile shape)
            raises TypeError (dtype) or ValueError naming the reason and the backends that can.

    Returns:
        `out [B, Hq, Lq, D]` in q's dtype, and `lse` when asked. Differentiable in q, k, v.
    """
    _check_inputs(q, k, v, layout, scale, backend)
    name = dispatch.choose_for(q, k, v, layout) if backend == "auto" else backend
    reason = dispatch.can_run(name, q, k, v, layout)
    if reason != "available":
        error = TypeError if reason.startswith("dtype") else ValueError
        raise error(f"backend {name!r} cannot run this call: {reason}; backends that can: "
                    f"{dispatch.capable(q, k, v, layout)}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    out, lse = dispatch.module(name).run(q, k, v, layout, scale=scale)
    return (out, lse) if return_lse else out


def backends() -> dict[str, str]:
    """Backend name -> "available" or the reason it is not."""
    return dispatch.backends()


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, method, *, scale: float | None = None,
                     return_lse: bool = False, backend: str = "auto", context: dict | None = None, **params):
    """Select a layout with `method` (a registered name or a method object) and attend over it.

    Extra keyword arguments are the method's hyperparameters when `method` is a name; `context` holds
    the keywords of `Method.select`: `causal` (default: the method's), `grid` (`(H, W)` / `(T, H, W)`
    for image and video methods) and `layer`.
    """
    from blockattn import methods

    if isinstance(method, str):
        method = methods.get(method, **params)
    elif params:
        raise TypeError(f"hyperparameters {sorted(params)} can only be given with a method name")
    if not isinstance(method, methods.Method):
        raise TypeError(f"method must be a registered name or a blockattn.methods.Method, got {type(method).__name__}")
    if context is not None and not isinstance(context, dict):
        raise TypeError(f"context must be a dict of select() keywords (causal, grid, layer), got "
                        f"{type(context).__name__}")
    layout = method.select(q, k, **(context or {}))
    return attention(q, k, v, layout, scale=scale, return_lse=return_lse, backend=backend)
