"""SeerAttention gate: the AttnGate against a plain per-head transcription, the block-max ground truth
against a brute-force pool of the dense probabilities, the nz_ratio rule, selection, training and files."""
import itertools
import math

import pytest
import torch

import blockattn
from blockattn.modules.seer_gate import (SeerAttentionGate, _rope, block_max_ground_truth, gate_loss, invert_rope,
                                         load_gates, save_gates, select_blocks, topk_for_density)


def test_parameter_count_for_smollm2_shapes():
    gate = SeerAttentionGate(9, 3, 64)
    assert gate.project_queries and sum(p.numel() for p in gate.parameters()) == 147_456


def test_gate_equals_per_head_transcription():
    torch.manual_seed(0)
    gate = SeerAttentionGate(4, 2, 8, block_size=4, gate_dim=16).double()
    q, k = torch.randn(1, 4, 18, 8, dtype=torch.float64), torch.randn(1, 2, 18, 8, dtype=torch.float64)
    logits = gate(q, k)
    n = 5
    for h in range(4):
        qs, ks = [], []
        for b in range(n):
            rows = slice(4 * b, min(18, 4 * b + 4))  # the last block holds 2 valid tokens
            qs.append(q[0, h, rows].mean(0) @ gate.q_weight[h])
            kb = k[0, h // 2, rows]
            ks.append(torch.cat([kb.amax(0), kb.amin(0), kb.mean(0)]) @ gate.k_weight[h // 2])
        starts = torch.arange(n) * 4
        qh, kh = (_rope(torch.stack(x)[None, None], starts, 1e4)[0, 0] for x in (qs, ks))
        want = (qh @ kh.T / 4).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(logits[0, h], want)


def test_ground_truth_is_the_row_normalised_block_max_of_probabilities():
    q, k = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 37, 8)
    target = block_max_ground_truth(q, k, block_size=8)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)
    P = torch.softmax(scores.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf")), -1)
    n = 5
    brute = torch.zeros(2, 4, n, n)
    for i in range(n):
        for j in range(i + 1):
            brute[:, :, i, j] = P[:, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].amax((-1, -2))
    torch.testing.assert_close(target, brute / brute.sum(-1, keepdim=True))
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 4, n))
    assert bool((target.triu(1) == 0).all())


def test_topk_rule_and_density():
    assert topk_for_density(0.5, 32) == math.floor((1 - math.sqrt(0.5)) * 32) == 9
    assert topk_for_density(0.01, 8) == 1
    for rho in (0.1, 0.25, 0.5):
        future = torch.ones(256, 256, dtype=torch.bool).triu(1)
        logits = torch.randn(1, 1, 256, 256).masked_fill(future, float("-inf"))
        layout = select_blocks(logits, length=256 * 4, block_size=4, density=rho, last_block_dense=False)
        assert abs(layout.density("causal") - rho) < 0.03


def _official_mask(scores, *, nz_ratio=None, threshold=None, last_block_dense=True):
    """A plain re-creation of the official get_sparse_attn_mask_from_nz_ratio / _from_threshold
    (seer_attn/modules/common.py): top-k on the gate scores (masked entries included) or scores > threshold,
    the last two block rows set dense, then tril."""
    n = scores.shape[-1]
    if nz_ratio is not None:
        topk = int((1 - math.sqrt(1 - nz_ratio)) * n) or 1
        mask = torch.zeros(scores.shape, dtype=torch.bool)
        for index in itertools.product(*(range(s) for s in scores.shape[:-1])):
            mask[index + (scores[index].argsort(descending=True)[:topk],)] = True
    else:
        mask = scores > threshold
    if last_block_dense:
        mask[:, :, -2:, :] = True
    return mask.tril()


@pytest.mark.parametrize("rule", [dict(nz_ratio=0.1), dict(nz_ratio=0.25), dict(nz_ratio=0.5),
                                  dict(threshold=0.02), dict(threshold=0.3)])
@pytest.mark.parametrize("last_block_dense", [True, False])
def test_selection_equals_the_official_rule(rule, last_block_dense):
    torch.manual_seed(5)
    n, block = 13, 4
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    logits = torch.randn(2, 3, n, n).masked_fill(future, -1e9)  # the official gate masks with -1e9
    if "nz_ratio" in rule:
        layout = select_blocks(logits, length=n * block - 1, block_size=block, density=rule["nz_ratio"],
                               last_block_dense=last_block_dense)
        want = _official_mask(logits, last_block_dense=last_block_dense, **rule)
    else:  # threshold mode: the official gate softmaxes its masked scores first
        layout = select_blocks(logits, length=n * block - 1, block_size=block, threshold=rule["threshold"],
                               last_block_dense=last_block_dense)
        want = _official_mask(torch.softmax(logits, -1), last_block_dense=last_block_dense, **rule)
    assert torch.equal(layout.to_dense(), want)
    if rule.get("threshold") == 0.3:  # some rows keep nothing, as in the official code: allowed, output zero
        assert not bool(want.any(-1).all()) and layout.allow_empty_rows
    forced = select_blocks(logits, length=n * block - 1, block_size=block, density=rule.get("nz_ratio"),
                           threshold=rule.get("threshold"), last_block_dense=last_block_dense, force_diagonal=True)
    assert torch.equal(forced.to_dense(), want | torch.eye(n, dtype=torch.bool))


def test_density_one_is_dense_and_diagonal_is_always_kept():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    gate = SeerAttentionGate(2, 2, 8, block_size=8, gate_dim=8)
    layout = gate.select(q, k, density=1.0, allow_untrained=True)
    full = blockattn.attention(q, k, v, blockattn.BlockLayout.from_dense(torch.ones(5, 5, dtype=torch.bool), q_len=40,
                               k_len=40, block_q=8, block_k=8, causal=True))
    torch.testing.assert_close(blockattn.attention(q, k, v, layout), full)
    sparse = gate.select(q, k, threshold=0.99, last_block_dense=False, force_diagonal=True, allow_untrained=True)
    assert bool(sparse.to_dense()[0, :, torch.arange(5), torch.arange(5)].all())


def test_inverse_rope_round_trip():
    x = torch.randn(1, 2, 10, 16, dtype=torch.float64)
    inv = 1e4 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angles = torch.arange(10, dtype=torch.float64).view(-1, 1) * inv
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    y = x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin
    torch.testing.assert_close(invert_rope(y, cos, sin), x)


def test_training_lowers_the_distillation_loss():
    torch.manual_seed(2)
    q = torch.randn(2, 2, 64, 8)
    k = q[:, :, torch.randperm(64)] + 0.1 * torch.randn(2, 2, 64, 8)  # structured attention to learn
    target = block_max_ground_truth(q, k, block_size=8)
    gate = SeerAttentionGate(2, 2, 8, block_size=8, gate_dim=16)
    optimiser = torch.optim.AdamW(gate.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss = gate_loss(gate(q, k), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_files_and_bad_input(tmp_path):
    gate = SeerAttentionGate(2, 1, 8, block_size=8, gate_dim=8)
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="not been trained"):
        gate.select(q, k, density=0.5)
    gate.trained_steps += 1
    path = save_gates({3: gate, 7: gate}, str(tmp_path / "gates.pt"), model="smollm2-135m")
    loaded = load_gates(path, model="smollm2-135m", block_size=8)
    assert sorted(loaded) == [3, 7] and loaded[3].trained and torch.equal(loaded[7].k_weight, gate.k_weight)
    with pytest.raises(ValueError, match="model"):
        load_gates(path, model="gemma3-270m")
    with pytest.raises(ValueError, match="block_size"):
        load_gates(path, model="smollm2-135m", block_size=64)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="density"):
            gate.select(q, k, density=bad)
    with pytest.raises(ValueError, match="exactly one"):
        gate.select(q, k)
    with pytest.raises(ValueError, match="expected q_nope"):
        gate(q, q)
    with pytest.raises(ValueError, match="k_pool"):
        SeerAttentionGate(2, 1, 8, k_pool=("median",))


def test_seer_method_selects_with_the_layer_gate_from_post_rope_inputs(tmp_path):
    from blockattn.methods.seer import SeerAttention
    from blockattn.modules.seer_gate import _rope_tables
    torch.manual_seed(3)
    gate = SeerAttentionGate(4, 2, 8, block_size=8, gate_dim=16, rope_theta=1e4)
    gate.trained_steps += 1
    path = save_gates({2: gate}, str(tmp_path / "g.pt"), model="smollm2-135m")
    q_nope, k_nope = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    cos, sin = _rope_tables(40, 8, 1e4, "cpu")
    rot = lambda x: x * cos + torch.cat([-x[..., 4:], x[..., :4]], -1) * sin  # noqa: E731
    method = SeerAttention(gates=path, density=0.5, block_size=8)
    layout = method.select(rot(q_nope), rot(k_nope), layer=2)
    want = gate.select(q_nope, k_nope, density=0.5)
    assert torch.equal(layout.to_dense(), want.to_dense())
    with pytest.raises(ValueError, match="layer"):
        method.select(rot(q_nope), rot(k_nope), layer=0)
    with pytest.raises(ValueError, match="gates=PATH"):
        SeerAttention()
    with pytest.raises(ValueError, match="block_size"):
        SeerAttention(gates=path, block_size=64)
    with pytest.raises(ValueError, match="density"):
        SeerAttention(gates=path, density=1.5, block_size=8)


def test_seer_training_run_on_smollm2_at_a_tiny_size():
    from blockattn.modules.seer_train import run
    result = run(length=128, train_windows=1, eval_windows=1, steps=2, layer=1)
    assert result["gates"][1].trained and len(result["losses"]) == 2
    assert {r["selector"] for r in result["rows"]} == {"trained gate", "untrained gate", "pooled q.k (MoBA-like)",
                                                         "oracle top-k"}
