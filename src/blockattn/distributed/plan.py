"""The context-parallel plan of a layout: who owns which blocks, who needs which K/V blocks, who sends what.

Based on the shard-need idea of MagiAttention (https://github.com/SandAI-org/MagiAttention, "zero-redundant
communication") and the head-tail causal balance of torch's `_HeadTailLoadBalancer` / zigzag ring attention
(https://github.com/zhuzilin/ring-flash-attention).

The rule: the sequence is cut into blocks of `block` tokens (the layout's block size); each rank owns a set
of blocks and holds the queries, keys and values of exactly those tokens. Rank r needs key block j when one
of its query blocks lists j (in any batch or head): that is the shard-need matrix `need [P, nB]`. Rank r
receives from its owner every block it needs and does not own, and nothing else, so a banded layout costs a
halo exchange whatever the rank count and a causal one never moves a future shard. The ownership is chosen
to balance active tiles (listed (query block, key block) pairs summed over batch and heads) and tokens
between ranks: among equal contiguous ranges, contiguous ranges balanced by tiles, a head-tail split
(chunk r and chunk 2P-1-r: exact balance for causal) and a greedy tile-count split of equal chunks, the one
whose worse imbalance (max/mean of tiles or of tokens) is lowest wins, near-ties going to the one that
moves fewer blocks.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from blockattn.layout import BlockLayout, _cdiv

__all__ = ["Plan", "make_plan", "BALANCES"]

BALANCES = ("auto", "contiguous", "tile-contiguous", "head-tail", "greedy")

# a candidate whose imbalance (max/mean) is within this of the best one counts as balanced, and the
# one that moves fewer blocks among those wins (a banded layout stays contiguous: a head-tail split
# of a sliding window is as balanced but doubles the halo, a greedy one moves every block)
_LOAD_SLACK = 0.10

# id(layout) -> {(world, balance): Plan}; an entry leaves with its layout (keyed by identity, so it does
# not depend on BlockLayout being hashable)
_CACHE: dict = {}


def make_plan(layout: BlockLayout, world_size: int, *, balance: str = "auto") -> Plan:
    """The plan of `layout` over `world_size` ranks, computed once per (layout, world size, balance).

    Args:
        layout (BlockLayout):
            the global layout; self-attention over one sequence (`q_len == k_len`, `block_q == block_k`).
        world_size (int):
            number of ranks the sequence is sharded over.
        balance (str, Optional):
            "auto" (the best balanced of the four splits, fewer moved blocks on ties), "contiguous",
            "tile-contiguous", "head-tail" or "greedy". Default: "auto".

    Returns:
        a `Plan`.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if layout.q_len != layout.k_len or layout.block_q != layout.block_k:
        raise ValueError(f"context parallelism shards one sequence: the layout needs q_len == k_len and "
                         f"block_q == block_k, got q_len={layout.q_len}, k_len={layout.k_len}, "
                         f"block_q={layout.block_q}, block_k={layout.block_k}")
    if layout.num_q_blocks < world_size:
        raise ValueError(f"a layout of {layout.num_q_blocks} blocks (q_len={layout.q_len}, block={layout.block_q}) "
                         f"cannot be sharded over {world_size} ranks: every rank needs at least one block")
    per_layout = _CACHE.get(id(layout))
    if per_layout is None:
        per_layout = _CACHE[id(layout)] = {}
        weakref.finalize(layout, _CACHE.pop, id(layout), None)
    key = (world_size, balance)
    if key not in per_layout:
        per_layout[key] = Plan._build(layout, world_size, balance)
    return per_layout[key]


@dataclass(eq=False)
class RankPlan:
    """What one rank needs at run time: its sub-layout and the token indices of every transfer."""
    sublayout: BlockLayout
    # local token indices of own blocks this rank's queries need, and their rows in the gathered K/V
    own_local: Tensor
    own_pos: Tensor
    # src rank -> rows of the gathered K/V that its blocks fill
    recv_pos: dict
    # dst rank -> local token indices of the blocks it needs from this rank
    send_local: dict
    gathered_len: int

    def to(self, device) -> RankPlan:
        move = lambda d: {r: t.to(device) for r, t in d.items()}
        return RankPlan(self.sublayout.to(device), self.own_local.to(device), self.own_pos.to(device),
                        move(self.recv_pos), move(self.send_local), self.gathered_len)


@dataclass(eq=False)
class Plan:
    """Ownership, shard-need matrix and communication schedule of one layout over `world_size` ranks.

    Attributes:
        world_size, block, num_blocks, seq_len: the facts the plan is built for.
        owner (Tensor): int64 `[nB]`, the rank that owns each block.
        blocks (list[Tensor]): per rank, its sorted global block ids (its shard is their tokens in order).
        need (Tensor): bool `[P, nB]`, whether rank r's query blocks list key block j.
        tiles (Tensor): int64 `[P]`, active tiles (over batch and heads) each rank computes.
        balance (str): the split used ("contiguous", "tile-contiguous", "head-tail" or "greedy").
        fingerprint (int): a digest of the layout, compared between ranks at every call.
    """
    world_size: int
    block: int
    num_blocks: int
    seq_len: int
    owner: Tensor
    blocks: list
    need: Tensor
    tiles: Tensor
    balance: str
    fingerprint: int
    _layout_ref: object = field(repr=False, default=None)
    _ranks: dict = field(repr=False, default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def _build(cls, layout: BlockLayout, world_size: int, balance: str) -> Plan:
        layout_cpu = layout.to("cpu")
        n_b = layout.num_q_blocks
        weight = layout_cpu.kv_counts.sum(dim=(0, 1)).long()  # [nB] tiles per query block
        tiles = layout_cpu.listed_tiles()
        sizes = (layout.q_len - torch.arange(n_b) * layout.block_q).clamp(max=layout.block_q)
        candidates = []
        for name in (BALANCES[1:] if balance == "auto" else (balance,)):
            owner = _SPLITS[name](weight, world_size)
            if owner is None:
                continue
            need = _need_matrix(owner, tiles, world_size, n_b)
            load = torch.zeros(world_size, dtype=torch.long).index_add_(0, owner, weight)
            tokens = torch.zeros(world_size, dtype=torch.long).index_add_(0, owner, sizes)
            # the worse of the tile balance (attention time) and the token balance (memory, and the
            # time of everything outside attention)
            score = max(_ratio(load), _ratio(tokens))
            moved = int(need.sum()) - int(need[owner, torch.arange(n_b)].sum())
            candidates.append((score, moved, name, owner, need, load))
        if not candidates:
            raise ValueError(f"balance={balance!r} needs at least {2 * world_size} blocks, the layout has {n_b}")
        best = min(c[0] for c in candidates)
        balanced = [c for c in candidates if c[0] <= best + _LOAD_SLACK]
        _, _, name, owner, need, load = min(balanced, key=lambda c: c[1])
        blocks = [torch.nonzero(owner == r).flatten() for r in range(world_size)]
        return cls(world_size=world_size, block=layout.block_q, num_blocks=n_b, seq_len=layout.q_len, owner=owner,
                   blocks=blocks, need=need, tiles=load, balance=name, fingerprint=_fingerprint(layout_cpu),
                   _layout_ref=weakref.ref(layout))

    # ------------------------------------------------------------------ token facts
    def block_sizes(self, block_ids: Tensor) -> Tensor:
        """Tokens in each of `block_ids` (the last block of the sequence may be short)."""
        return (self.seq_len - block_ids * self.block).clamp(max=self.block)

    def local_len(self, rank: int) -> int:
        """Tokens in `rank`'s shard."""
        return int(self.block_sizes(self.blocks[rank]).sum())

    def token_index(self, rank: int) -> Tensor:
        """int64 `[local_len]`: the global positions of `rank`'s tokens, in shard order."""
        return _tokens(self.blocks[rank], self.block, self.seq_len)

    # ------------------------------------------------------------------ traffic
    def shard_need(self) -> Tensor:
        """bool `[P, P]`: whether rank r's queries touch any key of rank s's shard."""
        out = torch.zeros(self.world_size, self.world_size, dtype=torch.bool)
        r, j = self.need.nonzero(as_tuple=True)
        out[r, self.owner[j]] = True
        return out

    def recv_blocks(self, rank: int) -> dict:
        """src rank -> the sorted global blocks `rank` receives from it (never its own)."""
        needed = self.need[rank].nonzero().flatten()
        src = self.owner[needed]
        return {int(s): needed[src == s] for s in src.unique() if int(s) != rank}

    def recv_tokens(self) -> Tensor:
        """int64 `[P]`: K/V tokens each rank receives."""
        foreign = self.need & (self.owner.view(1, -1) != torch.arange(self.world_size).view(-1, 1))
        return (foreign.long() * self.block_sizes(torch.arange(self.num_blocks)).view(1, -1)).sum(1)

    def send_tokens(self) -> Tensor:
        """int64 `[P]`: K/V tokens each rank sends (a block it owns, once per rank that needs it)."""
        foreign = self.need & (self.owner.view(1, -1) != torch.arange(self.world_size).view(-1, 1))
        per_block = foreign.sum(0) * self.block_sizes(torch.arange(self.num_blocks))
        return torch.zeros(self.world_size, dtype=torch.long).index_add_(0, self.owner, per_block)

    # ------------------------------------------------------------------ the per-rank part
    def rank_plan(self, rank: int, layout: BlockLayout, device=None) -> RankPlan:
        """Sub-layout and transfer indices of `rank` (built once per device; default the layout's)."""
        device = torch.device(layout.device if device is None else device)
        key = (rank, str(device))
        if key not in self._ranks:
            self._ranks[key] = _build_rank_plan(self, rank, layout.to("cpu")).to(device)
        return self._ranks[key]

    def describe(self) -> str:
        mean = float(self.tiles.float().mean())
        return (f"Plan(P={self.world_size}, balance={self.balance}, blocks={self.num_blocks}x{self.block}, "
                f"tiles max/mean={float(self.tiles.max()) / max(mean, 1e-9):.3f}, "
                f"recv tokens max={int(self.recv_tokens().max())})")


# ---------------------------------------------------------------------- splits (return owner [nB] or None)
def _contiguous(weight: Tensor, world: int) -> Tensor:
    """P contiguous ranges of (nearly) equal length."""
    return torch.arange(len(weight)) * world // len(weight)


def _tile_contiguous(weight: Tensor, world: int) -> Tensor:
    """P contiguous ranges minimising the largest range's tiles (binary search on the capacity)."""
    n = len(weight)
    w = weight.tolist()

    def cuts(cap):
        # greedy ranges of at most `cap`, leaving at least one block per remaining rank
        starts, load = [0], 0
        for i, x in enumerate(w):
            left_ranks = world - len(starts)
            if i > starts[-1] and (load + x > cap or n - i == left_ranks) and left_ranks > 0:
                starts.append(i)
                load = 0
            load += x
        return starts

    def feasible(cap):
        starts = cuts(cap)
        bounds = starts[1:] + [n]
        return len(starts) == world and all(sum(w[a:b]) <= cap for a, b in zip(starts, bounds))

    lo, hi = max(w + [0]), max(sum(w), 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    starts = cuts(lo)
    owner = torch.zeros(n, dtype=torch.long)
    for r, s in enumerate(starts):
        owner[s:] = r
    return owner


def _head_tail(weight: Tensor, world: int) -> Tensor | None:
    """2P equal chunks; rank r owns chunk r and chunk 2P-1-r (the zigzag of ring attention)."""
    n = len(weight)
    if n < 2 * world:
        return None
    chunk = torch.arange(n) * (2 * world) // n  # equal-length chunks, the extra blocks spread evenly
    return torch.where(chunk < world, chunk, 2 * world - 1 - chunk)


def _greedy(weight: Tensor, world: int) -> Tensor:
    """Chunks of about nB/(4P) blocks, heaviest first, each to the least loaded rank that holds fewer than
    its share of chunks (LPT scheduling with equal chunk counts, so tokens stay balanced too)."""
    n = len(weight)
    n_chunks = min(n, 4 * world)
    chunk = torch.arange(n) * n_chunks // n
    chunk_w = torch.zeros(n_chunks, dtype=torch.long).index_add_(0, chunk, weight).tolist()
    share = _cdiv(n_chunks, world)
    load, count, owner_of = [0] * world, [0] * world, [0] * n_chunks
    for c in sorted(range(n_chunks), key=lambda c: (-chunk_w[c], c)):
        r = min((r for r in range(world) if count[r] < share), key=lambda r: (load[r], count[r], r))
        owner_of[c] = r
        load[r] += chunk_w[c]
        count[r] += 1
    return torch.tensor(owner_of, dtype=torch.long)[chunk]


_SPLITS = {"contiguous": _contiguous, "tile-contiguous": _tile_contiguous, "head-tail": _head_tail,
           "greedy": _greedy}


# ---------------------------------------------------------------------- helpers
def _ratio(x: Tensor) -> float:
    return float(x.max()) / max(float(x.float().mean()), 1e-9)


def _need_matrix(owner: Tensor, tiles, world: int, n_b: int) -> Tensor:
    _, _, qb, kb = tiles
    need = torch.zeros(world, n_b, dtype=torch.bool)
    need[owner[qb], kb] = True
    return need


def _tokens(block_ids: Tensor, block: int, seq_len: int) -> Tensor:
    if len(block_ids) == 0:
        return torch.zeros(0, dtype=torch.long)
    pos = (block_ids.view(-1, 1) * block + torch.arange(block).view(1, -1)).flatten()
    return pos[pos < seq_len]


def _fingerprint(layout: BlockLayout) -> int:
    digest = hashlib.blake2b(digest_size=7)
    digest.update(repr((layout.q_len, layout.k_len, layout.block_q, layout.block_k, layout.causal, layout.window,
                        tuple(layout.kv_counts.shape), tuple(layout.kv_indices.shape))).encode())
    for t in (layout.kv_counts, layout.kv_indices, layout.tile_mask_ids, layout.tile_masks):
        if t is not None:
            digest.update(t.contiguous().numpy().tobytes())
    # 56 bits: fits an int64 tensor without sign trouble
    return int.from_bytes(digest.digest(), "little")


def _positions(sorted_ids: Tensor, n_b: int) -> Tensor:
    """int64 `[nB]`: the index of each block in `sorted_ids`, -1 where absent."""
    pos = torch.full((n_b,), -1, dtype=torch.long)
    pos[sorted_ids] = torch.arange(len(sorted_ids))
    return pos


def _analytically_full(layout: BlockLayout, qb: Tensor, kb: Tensor) -> Tensor:
    """bool `[T]`: tiles whose every in-bounds pair the causal/window rules keep (interval arithmetic)."""
    bq, bk = layout.block_q, layout.block_k
    q_first = qb * bq + layout.offset
    q_last = ((qb + 1) * bq).clamp(max=layout.q_len) - 1 + layout.offset
    k_first = kb * bk
    k_last = ((kb + 1) * bk).clamp(max=layout.k_len) - 1
    full = torch.ones_like(qb, dtype=torch.bool)
    if layout.causal:
        full &= k_last <= q_first
    if layout.window is not None:
        full &= (k_first >= q_last - layout.window[0]) & (k_last <= q_first + layout.window[1])
    return full


def _build_rank_plan(plan: Plan, rank: int, layout: BlockLayout) -> RankPlan:
    """The layout restricted to `rank`'s query blocks and the key blocks it gathers, block ids remapped.

    The gathered keys are the needed blocks in global order, so the remap keeps every block list sorted
    and the sequence's short last block (if needed) stays last. The causal/window rules do not survive a
    remap of positions, so every tile they cut becomes an explicit tile mask (identical masks stored once).
    """
    n_b, block = plan.num_blocks, plan.block
    q_blocks = plan.blocks[rank]
    k_blocks = plan.need[rank].nonzero().flatten()
    k_pos = _positions(k_blocks, n_b)

    counts = layout.kv_counts[:, :, q_blocks]
    indices = layout.kv_indices[:, :, q_blocks]
    max_k = max(int(counts.max()) if counts.numel() else 0, 1)
    indices = indices[..., :max_k]
    valid = indices >= 0
    sub_indices = torch.where(valid, k_pos[indices.clamp(min=0).long()], -1).to(torch.int32)

    # which listed tiles need an explicit mask in the new frame
    b, h, lq, slot = valid.nonzero(as_tuple=True)
    gq, gk = q_blocks[lq], indices[b, h, lq, slot].long()
    explicit = torch.zeros_like(gq, dtype=torch.bool)
    if layout.tile_mask_ids is not None:
        explicit = layout.tile_mask_ids[:, :, q_blocks][..., :max_k][b, h, lq, slot] >= 0
    masked = explicit | ~_analytically_full(layout, gq, gk)
    tile_mask_ids = tile_masks = None
    if bool(masked.any()):
        b, h, lq, slot, gq, gk = (t[masked] for t in (b, h, lq, slot, gq, gk))
        masks = torch.cat([layout.tile_token_masks(b[s], h[s], gq[s], gk[s]).flatten(1)
                           for s in torch.arange(len(b)).split(4096)])
        tile_masks, inverse = torch.unique(masks, dim=0, return_inverse=True)
        tile_masks = tile_masks.view(-1, block, block)
        tile_mask_ids = torch.full(sub_indices.shape, -1, dtype=torch.int32)
        tile_mask_ids[b, h, lq, slot] = inverse.to(torch.int32)

    q_len = int(plan.block_sizes(q_blocks).sum())
    k_len = int(plan.block_sizes(k_blocks).sum())
    # every row keeps exactly the keys it kept globally, so the global row check already holds
    sub = BlockLayout(counts, sub_indices, q_len=q_len, k_len=k_len, block_q=block, block_k=block,
                      tile_mask_ids=tile_mask_ids, tile_masks=tile_masks, allow_empty_rows=True)

    own_pos_blocks = _positions(q_blocks, n_b)  # block -> index in this rank's shard
    own_needed = k_blocks[plan.owner[k_blocks] == rank]
    own_local = _local_tokens(own_needed, own_pos_blocks, plan)
    own_pos = _local_tokens(own_needed, k_pos, plan)
    recv_pos = {src: _local_tokens(ids, k_pos, plan) for src, ids in plan.recv_blocks(rank).items()}
    send_local = {}
    for dst in range(plan.world_size):
        if dst == rank:
            continue
        ids = q_blocks[plan.need[dst, q_blocks]]
        if len(ids):
            send_local[dst] = _local_tokens(ids, own_pos_blocks, plan)
    return RankPlan(sub, own_local, own_pos, recv_pos, send_local, k_len)


def _local_tokens(block_ids: Tensor, position: Tensor, plan: Plan) -> Tensor:
    """Token rows of `block_ids` in a tensor that holds blocks at `position[block] * block` (full blocks
    before, only the sequence's last block may be short and it always comes last)."""
    if len(block_ids) == 0:
        return torch.zeros(0, dtype=torch.long)
    start = position[block_ids] * plan.block
    rows = (start.view(-1, 1) + torch.arange(plan.block).view(1, -1))
    keep = (block_ids.view(-1, 1) * plan.block + torch.arange(plan.block).view(1, -1)) < plan.seq_len
    return rows[keep]
