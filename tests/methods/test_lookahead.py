"""`Method.within_block_lookahead` is True exactly for the LLM-prefill methods whose key set for a query
can depend on later tokens of the prompt: changing only the tokens after position t, inside the last
query block, changes the layout rows of tokens before t. Checked for every registered method that
serves a causal model on a plain sequence (the training-free ones and SeerAttention on a tiny gate),
with small hyperparameters so every rule is sparse on 256 tokens."""
import pytest
import torch

from blockattn import methods

LENGTH, LATER = 256, 8  # the last 8 tokens change: inside the last block of every method here (>= 32 tokens)
SMALL = dict(
    xattention=dict(block_size=32, threshold=0.5), moba=dict(block_size=32, top_k=1, tile_size=32),
    vertical_slash=dict(vertical_size=40, slash_size=60, last_q=16, block_size=32),
    hip=dict(k=64, block_size_q=32, block_size_k=32),
    sale=dict(block_size=32, dense_below=0, threshold=0.3, local_window=32, segment=32),
    anchor=dict(step=2, block_size=32, theta=1.0),
    longheads=dict(window_size=32, atten_length=96, begin_selective_length=64, tile_size=32),
    biformer=dict(n_win=4, topk=2, tile_size=32), paro=dict(block_size=32, density=0.3),
    routing=dict(num_clusters=4, tile_size=32), dense=dict(block_size=32),
    sliding_window=dict(window=40, block_size=32), streaming=dict(sink=4, window=40, block_size=32),
    a_shape=dict(sink=32, window=64, block_size=32))


def causal_names():
    names = []
    for name in methods.training_free():
        cls = type(methods.get(name, **SMALL.get(name, {})))
        if True in cls.causal_modes and not cls.needs_grid:
            names.append(name)
    return names + ["seer"]


@pytest.fixture(scope="module")
def seer_gates(tmp_path_factory):
    from blockattn.modules.seer_gate import SeerAttentionGate, save_gates
    torch.manual_seed(0)
    gate = SeerAttentionGate(4, 2, 16, block_size=32, gate_dim=16)
    gate.trained_steps += 1
    return save_gates({0: gate}, str(tmp_path_factory.mktemp("seer") / "gates.pt"), model="tiny")


def make(name, seer_gates):
    if name == "seer":  # the default keeps the last two query-block rows dense, which would hide it
        return methods.get("seer", gates=seer_gates, model="tiny", block_size=32, density=0.3,
                           last_block_dense=False), dict(layer=0)
    return methods.get(name, **SMALL.get(name, {})), {}


def earlier_rows_change(method, context) -> bool:
    """Whether changing the last LATER tokens' q and k (a later query made to attend to one past key,
    later keys redrawn) changes any layout row before them, for some of a few seeded inputs."""
    t = LENGTH - LATER
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q, k = torch.randn(1, 4, LENGTH, 16, generator=g) * 0.5, torch.randn(1, 2, LENGTH, 16, generator=g)
        q2, k2 = q.clone(), k.clone()
        past = int(torch.randint(40, t // 2, (1,), generator=g))
        q2[:, :, t:] = 4 * k.repeat_interleave(2, 1)[:, :, past:past + 1]
        k2[:, :, t:] = 3 * torch.randn(1, 2, LATER, 16, generator=g)
        before = method.select(q, k, causal=True, **context)
        after = method.select(q2, k2, causal=True, **context)
        rows = lambda layout: layout.token_mask_rows(0, layout.num_q_blocks)[:, :, :t]  # noqa: E731
        if not torch.equal(rows(before), rows(after)):
            return True
    return False


@pytest.mark.parametrize("name", causal_names())
def test_within_block_lookahead_flag_matches_the_rule(name, seer_gates):
    method, context = make(name, seer_gates)
    assert isinstance(type(method).within_block_lookahead, bool)
    assert earlier_rows_change(method, context) == type(method).within_block_lookahead, (
        f"{name}: within_block_lookahead={type(method).within_block_lookahead} but later tokens "
        f"{'do not change' if type(method).within_block_lookahead else 'change'} earlier tokens' key sets")


def test_the_check_sees_a_block_granular_rule():
    """The oracle can fail: a per-block rule written here (each 32-query block keeps the key block its
    mean query scores highest) is caught, and its per-token twin is not."""
    from blockattn.layout import BlockLayout

    class PerBlock:
        def __init__(self, per_token):
            self.per_token = per_token

        def select(self, q, k, causal=True):
            keys = k.repeat_interleave(2, 1).view(1, 4, LENGTH // 32, 32, 16).mean(3)
            queries = q if self.per_token else q.view(1, 4, LENGTH // 32, 32, 16).mean(3).repeat_interleave(32, 2)
            own = torch.arange(LENGTH) // 32
            past = torch.arange(LENGTH // 32).view(1, -1) < own.view(-1, 1)  # complete past blocks only
            best = (queries @ keys.transpose(-1, -2)).masked_fill(~past, float("-inf")).argmax(-1)  # [1, 4, L]
            mask = (torch.arange(LENGTH) // 32 == best.unsqueeze(-1)) | (own.view(-1, 1) == own.view(1, -1))
            mask &= torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
            return BlockLayout.from_token_mask(mask, block_q=32, block_k=32)

    assert earlier_rows_change(PerBlock(per_token=False), {})
    assert not earlier_rows_change(PerBlock(per_token=True), {})


def test_eval_report_footnotes_the_methods_with_lookahead():
    from blockattn.bench import harness
    entry = lambda name, params: {"method": harness.label(name, params), "name": name, "params": params,  # noqa: E731
                                  "cells": [{"task": "passkey", "length": 256, "found": True, "seconds": 1.0}],
                                  "accuracy": 1.0, "prefill_speedup": 1.0,
                                  "per_length": {256: {"accuracy": 1.0, "seconds": 1.0}}}
    results = {"config": {"lengths": [256], "tasks": ["passkey", "perplexity"]}, "baseline_sdpa_seconds": {256: 1.0},
               "methods": [entry("dense", {}), entry("xattention", {"stride": 16}), entry("streaming", {}),
                           entry("hip", {})]}
    for table in (harness.format_table(results), harness.format_length_table(results)):
        note = table.splitlines()[-1]
        assert note.startswith("Within-block lookahead: the numbers of xattention(stride=16), hip include it")
        assert "streaming" not in note and "dense" not in note
    results["methods"] = results["methods"][:1] + results["methods"][2:3]
    assert "lookahead" not in harness.format_table(results)
