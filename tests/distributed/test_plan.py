"""The context-parallel plan without processes: need matrix against a naive token-mask twin, ownership,
balance, traffic counts and argument checks."""
import pytest
import torch

from blockattn import BlockLayout, patterns
from blockattn.distributed import Plan, make_plan

B16 = dict(block_q=16, block_k=16)


def _layouts():
    return {
        "causal": patterns.causal(250, **B16),
        "sliding": patterns.sliding_window(256, window=32, **B16),
        "two_sided": patterns.sliding_window(256, window=20, causal=False, **B16),
        "random": patterns.random_blocks(256, density=0.2, heads=3, seed=2, **B16),
        "streaming": patterns.streaming(256, sink=16, window=32, **B16),
    }


@pytest.mark.parametrize("world", [1, 3, 8])
@pytest.mark.parametrize("name", list(_layouts()))
def test_need_matrix_matches_the_token_mask(name, world):
    layout = _layouts()[name]
    plan = make_plan(layout, world)
    mask = layout.to_token_mask().any(dim=(0, 1))  # [L, L]
    owned = torch.cat([plan.token_index(r) for r in range(world)])
    # every token belongs to exactly one rank, and a rank's shard is its blocks' tokens in order
    assert sorted(owned.tolist()) == list(range(layout.q_len))
    for r in range(world):
        keys = mask[plan.token_index(r)].any(0).nonzero().flatten()
        naive = torch.zeros(plan.num_blocks, dtype=torch.bool)
        naive[keys // layout.block_k] = True
        assert torch.equal(plan.need[r], naive), (name, world, r)
        assert plan.local_len(r) == len(plan.token_index(r))
    # traffic: a foreign needed block is received once and sent once
    assert int(plan.recv_tokens().sum()) == int(plan.send_tokens().sum())
    shard_need = plan.shard_need()
    for r in range(world):
        assert set(plan.recv_blocks(r)) == {s for s in range(world) if shard_need[r, s] and s != r}


def test_causal_head_tail_is_exactly_balanced():
    for world in (2, 4, 8):
        plan = make_plan(patterns.causal(64 * 16 * world, block_q=64, block_k=64), world)
        assert plan.balance == "head-tail"
        assert int(plan.tiles.max()) == int(plan.tiles.min())


def test_sliding_window_is_a_halo_independent_of_the_rank_count():
    layout = patterns.sliding_window(4096, window=256, **B16)
    for world in (2, 4, 8, 16):
        plan = make_plan(layout, world)
        assert plan.balance == "contiguous"
        assert int(plan.recv_tokens().max()) == 256, world


def test_the_plan_is_cached_per_layout():
    layout = patterns.causal(256, **B16)
    assert make_plan(layout, 4) is make_plan(layout, 4)
    assert make_plan(layout, 4, balance="greedy") is not make_plan(layout, 4)
    assert isinstance(make_plan(layout, 4), Plan)


@pytest.mark.parametrize("balance", ["contiguous", "tile-contiguous", "head-tail", "greedy"])
def test_every_split_gives_every_rank_blocks(balance):
    plan = make_plan(patterns.random_blocks(512, density=0.3, **B16), 5, balance=balance)
    assert plan.balance == balance
    assert all(len(b) > 0 for b in plan.blocks)
    assert int(plan.tiles.sum()) == int(patterns.random_blocks(512, density=0.3, **B16).kv_counts.sum())


@pytest.mark.parametrize("args,kwargs,error,message", [
    ((patterns.causal(64, 128, **B16), 2), {}, ValueError, "q_len == k_len"),
    ((patterns.causal(64, block_q=16, block_k=32), 2), {}, ValueError, "block_q == block_k"),
    ((patterns.causal(64, **B16), 5), {}, ValueError, "at least one block"),
    ((patterns.causal(64, **B16), 0), {}, ValueError, "world_size must be >= 1"),
    ((patterns.causal(64, **B16), 2.0), {}, TypeError, "world_size must be an int"),
    (("causal", 2), {}, TypeError, "layout must be a BlockLayout"),
    ((patterns.causal(64, **B16), 2), {"balance": "zigzag"}, ValueError, "balance must be one of"),
    ((patterns.causal(64, **B16), 3), {"balance": "head-tail"}, ValueError, "needs at least 6 blocks"),
])
def test_bad_arguments(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_plan(*args, **kwargs)


def test_sub_layout_keeps_each_rows_keys():
    """The re-indexed sub-layout of a rank, laid over the gathered keys, is the global mask's rows."""
    layout = BlockLayout.from_token_mask(lambda b, h, q, k: (k <= q) & ((q - k) % 5 != 1), q_len=200, k_len=200,
                                         **B16)
    plan = make_plan(layout, 3)
    mask = layout.to_token_mask()[0, 0]
    for r in range(3):
        rank_plan = plan.rank_plan(r, layout)
        keys = torch.cat([plan.token_index(s) for s in range(3)])  # any order: pick the gathered ones
        gathered = torch.empty(rank_plan.gathered_len, dtype=torch.long)
        gathered[rank_plan.own_pos] = plan.token_index(r)[rank_plan.own_local]
        for s, pos in rank_plan.recv_pos.items():
            sent = make_plan(layout, 3).rank_plan(s, layout).send_local[r]
            gathered[pos] = plan.token_index(s)[sent]
        assert len(set(gathered.tolist())) == len(gathered) and set(gathered.tolist()) <= set(keys.tolist())
        expected = mask[plan.token_index(r)][:, gathered]
        assert torch.equal(rank_plan.sublayout.to_token_mask()[0, 0], expected), r
