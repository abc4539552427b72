"""`shard`, `attention`, `unshard`: layout-aware context parallelism, shards in and shards out.

Based on the shard-need / targeted-send design of MagiAttention (https://github.com/SandAI-org/MagiAttention)
on top of blockattn's exact engine. The rule: rank r gathers exactly the key blocks its query blocks list
(its own and the ones it receives, see `plan.py`), then runs ONE local `blockattn.attention` over them with
the layout restricted and re-indexed to those blocks. Every row then sees all its keys in a single softmax,
so the output and lse are the single-process ones without any LSE merge, and autograd flows through the
engine's own backward; the exchange's backward sends each foreign block's dK/dV partial to its owner.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from blockattn._checks import check_qkv_tensors
from blockattn.distributed.comm import GatherKV
from blockattn.distributed.plan import Plan, _fingerprint, make_plan
from blockattn.functional import attention as _local_attention
from blockattn.layout import BlockLayout

__all__ = ["attention", "shard", "unshard"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# per-rank facts compared between ranks before any K/V moves
_FIELDS = ("status", "batch", "q_heads", "q_len", "k_heads", "k_len", "head_dim", "dtype", "layout", "world",
           "seq_len", "grad")


def _group_facts(group):
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("blockattn.distributed needs an initialised process group "
                           "(torch.distributed.init_process_group), none is")
    return dist.get_rank(group), dist.get_world_size(group)


def _resolve_plan(layout, plan, world: int) -> Plan:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if plan is None:
        return make_plan(layout, world)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a blockattn.distributed Plan (make_plan) or None, got {type(plan).__name__}")
    if plan.world_size != world:
        raise ValueError(f"plan was built for {plan.world_size} ranks but the group has {world}")
    if plan._layout_ref() is not layout and plan.fingerprint != _fingerprint(layout.to("cpu")):
        raise ValueError("plan was built for a different layout than the one passed")
    return plan


def _meta_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(facts: dict, error: Exception | None, group, world: int, check) -> None:
    """All-gather every rank's facts (and, if any rank failed locally, its message), then raise the
    same failure on every rank: one rank's bad input never leaves the others waiting on a send."""
    row = torch.tensor([int(facts.get(name, -1)) for name in _FIELDS], dtype=torch.int64,
                       device=_meta_device(group))
    table = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(table, row, group=group)
    table = torch.stack(table).cpu()
    if bool((table[:, 0] != 0).any()):
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        bad = [(r, m) for r, m in enumerate(messages) if m is not None]
        raise ValueError("; ".join(f"rank {r} rejected its inputs ({m})" for r, m in bad))
    problem = check({name: table[:, i].tolist() for i, name in enumerate(_FIELDS)})
    if problem:
        raise ValueError(problem)


def _check_across(plan: Plan):
    def check(col):
        world = len(col["status"])
        for name, what in (("layout", "the same layout"), ("world", "the same plan"),
                           ("batch", "the same batch size"), ("q_heads", "the same number of query heads"),
                           ("k_heads", "the same number of key/value heads"), ("head_dim", "the same head dim"),
                           ("dtype", "the same dtype"), ("grad", "the same requires_grad (or backward would hang)")):
            if len(set(col[name])) > 1:
                return f"every rank must pass {what}; per rank got {name}={col[name]}"
        total_q, total_k = sum(col["q_len"]), sum(col["k_len"])
        if total_q != plan.seq_len or total_k != plan.seq_len:
            return (f"the shards hold {total_q} query and {total_k} key tokens in all (per rank q {col['q_len']}, "
                    f"k {col['k_len']}), but the layout is built for q_len = k_len = {plan.seq_len}")
        expected = [plan.local_len(r) for r in range(world)]
        for name in ("q_len", "k_len"):
            if col[name] != expected:
                return (f"shard lengths do not match the plan: per rank {name} {col[name]}, the plan expects "
                        f"{expected} (lay inputs out with blockattn.distributed.shard(x, layout))")
        return None
    return check


def _validate(q, k, v, layout, plan, group, extra=None):
    """Local checks, then the facts of every rank compared: the same error on every rank, or
    (rank, world size, plan). `extra(world)` adds caller-specific local checks."""
    rank, world = _group_facts(group)
    facts, error, resolved = {"status": 1}, None, None
    try:
        resolved = _resolve_plan(layout, plan, world)
        check_qkv_tensors(q, k, v)
        if extra is not None:
            extra(world)
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
        if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
            raise ValueError(f"q and k must share batch and head dim, got {list(q.shape)} and {list(k.shape)}")
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
        if layout.batch not in (1, q.shape[0]) or layout.heads not in (1, q.shape[1]):
            raise ValueError(f"layout B|H=({layout.batch}, {layout.heads}) does not broadcast to "
                             f"batch {q.shape[0]} and {q.shape[1]} query heads")
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        facts = dict(status=0, batch=q.shape[0], q_heads=q.shape[1], q_len=q.shape[2], k_heads=k.shape[1],
                     k_len=k.shape[2], head_dim=q.shape[3], dtype=_DTYPES.index(q.dtype),
                     layout=resolved.fingerprint, world=resolved.world_size, seq_len=resolved.seq_len, grad=grad)
    except (TypeError, ValueError) as caught:
        error = caught
    _agree(facts, error, group, world, _check_across(resolved) if resolved is not None else None)
    return rank, world, resolved


def attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, group=None, return_lse: bool = False,
              plan: Plan | None = None, scale: float | None = None, backend: str = "auto"):
    """Exact attention over `layout` with the sequence sharded across the ranks of `group`.

    Each rank receives only the K/V blocks its query blocks list (a halo for a sliding window, no future
    shard for causal), runs one local `blockattn.attention` over them, and in backward sends the dK/dV of
    foreign blocks to their owners. Equals the single-process `blockattn.attention` on the full tensors.
    Based on https://github.com/SandAI-org/MagiAttention (zero-redundant communication).

    Args:
        q (Tensor):
            `[B, Hq, L_r, D]`, this rank's query shard, laid out by `shard(q_full, layout, group)`.
        k, v (Tensor):
            `[B, Hkv, L_r, D]`, this rank's key and value shards (the same tokens as q).
        layout (BlockLayout):
            the global layout, `q_len == k_len == L`, the same object contents on every rank.
        group (ProcessGroup, Optional):
            the context-parallel group. Default: the default group.
        return_lse (bool, Optional):
            also return the lse shard `[B, Hq, L_r]` float32. Default: False.
        plan (Plan, Optional):
            a precomputed `make_plan(layout, world_size)`. Default: the cached plan of `layout`.
        scale (float, Optional):
            score scale. Default: `D ** -0.5`.
        backend (str, Optional):
            the local engine's backend. Default: "auto".

    Returns:
        `out [B, Hq, L_r, D]` (and `lse [B, Hq, L_r]` when asked), this rank's shard. Differentiable.

    >>> # on every rank of an initialised group:
    >>> # out = attention(shard(q, lay), shard(k, lay), shard(v, lay), lay)
    >>> # torch.allclose(unshard(out, lay), blockattn.attention(q, k, v, lay), atol=1e-5)
    """
    rank, world, resolved = _validate(q, k, v, layout, plan, group)
    rank_plan = resolved.rank_plan(rank, layout, q.device)
    kg, vg = GatherKV.apply(k, v, rank_plan, group)
    return _local_attention(q, kg, vg, rank_plan.sublayout, scale=scale, return_lse=return_lse, backend=backend)


def shard(x: Tensor, layout: BlockLayout, group=None, *, plan: Plan | None = None, dim: int = 2) -> Tensor:
    """This rank's part of a full tensor: the tokens of the blocks the plan gives it, in order.

    Args:
        x (Tensor):
            the full tensor, e.g. `[B, H, L, D]` (sequence on `dim`), the same on every rank.
        layout (BlockLayout):
            the global layout (its plan decides the ownership; causal layouts get a head-tail split).
        group (ProcessGroup, Optional):
            the context-parallel group. Default: the default group.
        plan (Plan, Optional):
            a precomputed plan. Default: the cached plan of `layout`.
        dim (int, Optional):
            the sequence dimension (e.g. 1 for position ids `[B, L]`). Default: 2.

    Returns:
        `x` restricted to this rank's tokens along `dim` (differentiable; no communication).
    """
    rank, world = _group_facts(group)
    plan = _resolve_plan(layout, plan, world)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-dim x, got {dim!r}")
    if x.shape[dim] != plan.seq_len:
        raise ValueError(f"x has {x.shape[dim]} tokens on dim {dim} but the layout is built for {plan.seq_len}")
    return x.index_select(dim, plan.token_index(rank).to(x.device))


def unshard(x: Tensor, layout: BlockLayout, group=None, *, plan: Plan | None = None, dim: int = 2) -> Tensor:
    """The full tensor on every rank, from each rank's shard (the inverse of `shard`; not differentiable).

    Args:
        x (Tensor):
            this rank's shard, e.g. `[B, H, L_r, D]`.
        layout (BlockLayout):
            the global layout the shards were laid out by.
        group (ProcessGroup, Optional):
            the context-parallel group. Default: the default group.
        plan (Plan, Optional):
            a precomputed plan. Default: the cached plan of `layout`.
        dim (int, Optional):
            the sequence dimension. Default: 2.

    Returns:
        the full tensor, `L` tokens on `dim`, on every rank.
    """
    rank, world = _group_facts(group)
    facts, error, resolved = {"status": 1}, None, None
    try:
        resolved = _resolve_plan(layout, plan, world)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-dim x, got {dim!r}")
        dim = dim % x.dim()
        if x.dim() > 4:
            raise ValueError(f"x must have at most 4 dims, got shape {list(x.shape)}")
        other = [s for i, s in enumerate(x.shape) if i != dim] + [-1] * (4 - x.dim())
        facts = dict(status=0, batch=other[0], q_heads=other[1], head_dim=other[2], k_heads=x.dim(),
                     q_len=x.shape[dim], k_len=x.shape[dim], dtype=_DTYPES.index(x.dtype) if x.dtype in _DTYPES else 99,
                     layout=resolved.fingerprint, world=world, seq_len=resolved.seq_len)
    except (TypeError, ValueError) as caught:
        error = caught
    _agree(facts, error, group, world, _check_across(resolved) if resolved is not None else None)

    longest = max(resolved.local_len(r) for r in range(world))
    padded = torch.nn.functional.pad(x.detach().movedim(dim, -1), (0, longest - x.shape[dim])).contiguous()
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    full = padded.new_empty(*padded.shape[:-1], resolved.seq_len)
    for r, piece in enumerate(pieces):
        full[..., resolved.token_index(r).to(x.device)] = piece[..., :resolved.local_len(r)]
    return full.movedim(-1, dim)
