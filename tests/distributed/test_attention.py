"""blockattn.distributed on real processes (gloo, 127.0.0.1): exact against one process, traffic from the plan,
balance, and bad input refused on every rank without a hang.

One spawn per rank count runs every case (`_worker.py`); the tests below assert on what each rank saved.
"""
import socket
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

from blockattn.distributed import make_plan
from tests.distributed import _worker

WORLDS = (2, 4)
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    """world -> per-rank results; one spawn of max(WORLDS) processes, the 2-rank cases on a subgroup."""
    world = max(WORLDS)
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker.run, args=(world, _free_port(), out_dir), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s (a hang)")
        saved = [torch.load(f"{out_dir}/rank{r}.pt") for r in range(world)]
    return {size: [saved[r][size] for r in range(size)] for size in WORLDS}


def _ranks(results, world, case):
    per_rank = [r[case] for r in results[world]]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"rank {rank} of {world}: {res['error']}"
    return per_rank


CASES = list(_worker.layouts())


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES)
def test_equals_single_process(results, world, case):
    for rank, res in enumerate(_ranks(results, world, case)):
        where = f"{case}, rank {rank} of {world}"
        assert res["out"] <= 1e-5 and res["lse"] <= 1e-5 and res["unshard"] <= 1e-5, (where, res)
        for grad in ("dq", "dk", "dv"):
            assert res[grad] <= 1e-4, (where, grad, res[grad])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES)
def test_receives_only_what_its_queries_touch(results, world, case):
    for rank, res in enumerate(_ranks(results, world, case)):
        where = f"{case}, rank {rank} of {world}"
        # block level: the received blocks are exactly the foreign blocks the token mask says it needs
        assert res["received_equals_needed"], where
        # shard level: no message from a rank whose keys its queries never attend
        assert set(res["recv_from"]) <= set(res["shards_touched"]), (where, res["recv_from"], res["shards_touched"])
        assert res["fwd_bytes"] == res["plan_bytes"] <= res["shard_bytes"], (where, res)
        # backward moves the same blocks' gradients the other way: as many bytes in as were sent out
        assert res["total_recv_bytes"] >= res["fwd_bytes"], where


@pytest.mark.parametrize("case", ["sliding", "sliding_two_sided"])
def test_sliding_window_costs_a_halo_whatever_the_rank_count(results, case):
    peaks = []
    for world in WORLDS:
        per_rank = _ranks(results, world, case)
        for rank, res in enumerate(per_rank):
            assert res["fwd_bytes"] <= 1.1 * res["halo_bytes"], (case, world, rank, res["fwd_bytes"], res["halo_bytes"])
    # the plan for more ranks (interior ranks have both neighbours from 3 on) moves the same per rank
    layout = _worker.layouts()[case][0]
    peaks = [int(make_plan(layout, world).recv_tokens().max()) for world in (4, 8)]
    assert peaks[0] == peaks[1] > 0, peaks
    assert max(r["fwd_bytes"] for r in _ranks(results, 4, case)) == peaks[0] * res["bytes_per_token"]


def test_causal_is_balanced_at_four_ranks(results):
    per_rank = _ranks(results, 4, "causal")
    tiles = [res["local_tiles"] for res in per_rank]
    # the plan's count agrees with a recount from the layout, and max/mean stays within 5%
    assert tiles == per_rank[0]["tiles"], (tiles, per_rank[0]["tiles"])
    assert max(tiles) / (sum(tiles) / len(tiles)) <= 1.05, tiles
    assert per_rank[0]["balance"] == "head-tail"


@pytest.mark.parametrize("world", WORLDS)
def test_bad_input_is_refused_on_every_rank(results, world):
    expected = {
        "short_shard_on_one_rank": "but the layout is built for q_len = k_len = 256",
        "one_token_moved_between_ranks": "shard lengths do not match the plan",
        "k_longer_than_q_on_rank0": "key tokens in all",
        "layout_longer_than_shards": "layout is built for q_len = k_len = 272",
        "plan_for_another_group_size": f"plan was built for {world + 1} ranks but the group has {world}",
        "layouts_differ_between_ranks": "every rank must pass the same layout",
        "head_dim_differs_on_one_rank": "the same head dim",
        "q_not_a_tensor_on_one_rank": "q must be a torch.Tensor",
        "too_many_ranks_for_the_layout": "every rank needs at least one block",
    }
    for rank, res in enumerate(_ranks(results, world, "bad_inputs")):
        for case, message in expected.items():
            assert res[case] is not None, f"rank {rank} of {world} accepted {case}"
            assert message in res[case], (case, rank, res[case])
        assert res["after"] <= 1e-5, res["after"]


def test_hf_prefill_sharded_over_two_ranks_gives_the_same_logits(results):
    for rank, res in enumerate(_ranks(results, 2, "hf")):
        if "skip" in res:
            pytest.skip(f"transformers is not installed: {res['skip']}")
        assert res["rel"] <= 1e-5, (rank, res["rel"])
        assert res["restored"] != "blockattn_cp", res["restored"]


@pytest.mark.parametrize("world", WORLDS)
def test_head_parallel_dynamic_method_equals_single_process(results, world):
    for rank, res in enumerate(_ranks(results, world, "head_parallel")):
        assert res["out"] <= 1e-5 and res["lse"] <= 1e-5, (rank, res)
        assert max(res["dq"], res["dk"], res["dv"]) <= 1e-4, (rank, res)
        # 3 KV heads do not split over the group: refused on every rank (3 % 2 and 3 % 4)
        assert res["refused"] is not None and "divisible by the group size" in res["refused"], res["refused"]
