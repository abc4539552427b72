"""PAROAttention's offline plans: `calibrate` picks, per head, the axis order whose calibration attention is
most block-concentrated (checked against a float64 re-creation of the criterion and on synthetic heads
built block-diagonal under a known order), the plan round-trips through JSON and is used as it is by
`methods.get("paro", plan=PATH)` (no online estimation), and a plan that does not fit is refused."""
import json
import math

import pytest
import torch

from blockattn import methods
from blockattn.methods.paro import ORDERS, PAROAttention, load_plan, order_indices

GRID, BLOCK = (3, 4, 5), 6  # all 6 axis orders cut these 60 tokens into different 6-token blocks
LENGTH = math.prod(GRID)


def block_heads(orders, *, batch=1, seed=0, scale=6.0):
    """q = k `[batch, len(orders), L, 16]`: head h's tokens form one cluster per 6-token block of the
    sequence read in `orders[h]`, so its attention is block-diagonal exactly in that order."""
    g = torch.Generator().manual_seed(seed)
    heads = []
    for name in orders:
        position = torch.empty(LENGTH, dtype=torch.long)
        position[order_indices(GRID, name)] = torch.arange(LENGTH)
        clusters = torch.nn.functional.one_hot(position // BLOCK, 16).double() * scale
        heads.append(clusters + 0.2 * torch.randn(batch, LENGTH, 16, generator=g, dtype=torch.float64))
    x = torch.stack(heads, 1).float()
    return x, x.clone()


def naive_masses(q, k, order, causal):
    """float64 `[Hq, nQ, nK]`: per permuted query block, the mean over its rows of the softmax mass in
    each permuted key block, averaged over the batch (samples)."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    n = -(-LENGTH // BLOCK)
    out = torch.zeros(q.shape[1], n, n, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for qb in range(n):
                rows = [int(order[p]) for p in range(qb * BLOCK, min(LENGTH, (qb + 1) * BLOCK))]
                keys = [int(order[p]) for p in range(LENGTH)]
                for i in rows:
                    logits = k[b, h, keys] @ q[b, h, i] / 4.0  # one query against the keys in permuted order
                    if causal:
                        logits = logits.masked_fill(torch.tensor([j > i for j in keys]), float("-inf"))
                    probs = torch.softmax(logits, 0)  # in permuted order: key block p // BLOCK at position p
                    out[h, qb] += probs.view(n, BLOCK).sum(-1) / len(rows) / q.shape[0]
    return out


def naive_candidates(order, causal):
    n = -(-LENGTH // BLOCK)
    cand = torch.ones(n, n, dtype=torch.bool)
    if causal:
        for qb in range(n):
            for kb in range(n):
                cand[qb, kb] = min(order[kb * BLOCK:(kb + 1) * BLOCK]) <= max(order[qb * BLOCK:(qb + 1) * BLOCK])
    return cand


@pytest.mark.parametrize("causal", [False, True])
def test_calibration_picks_the_known_order_by_the_naive_criterion(causal):
    density = 0.2
    q, k = block_heads(ORDERS, batch=2)
    plan = PAROAttention(density=density, block_size=BLOCK, causal=causal).calibrate({3: [(q, k)]}, grid=GRID)
    layer = plan["layers"]["3"]
    assert layer["orders"] == list(ORDERS)  # every head gets the order its attention was built in
    masses = {}
    for name in ORDERS:
        order = order_indices(GRID, name)
        masses[name] = naive_masses(q, k, order, causal)
        cand = naive_candidates(order.tolist(), causal)
        keep = [max(1, math.ceil(density * int(c))) for c in cand.sum(-1)]
        for h in range(len(ORDERS)):
            score = sum(sum(sorted(masses[name][h, qb][cand[qb]].tolist(), reverse=True)[:keep[qb]])
                        for qb in range(len(keep))) / len(keep)
            assert layer["concentration"][h][name] == pytest.approx(score, abs=1e-5)
    for h, name in enumerate(ORDERS):
        scores = layer["concentration"][h]
        assert scores[name] == max(scores.values()) and scores[name] > 0.9


@pytest.mark.parametrize("causal", [False, True])
def test_plan_masks_keep_the_layers_density_of_blocks_by_calibration_mass(causal):
    """Candidate blocks whose mean calibration mass reaches the layer's threshold (the value keeping a
    `density` fraction of the layer's candidate blocks), plus the diagonal; on random q/k (no ties)."""
    density = 0.3
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 4, LENGTH, 16, generator=g), torch.randn(2, 2, LENGTH, 16, generator=g)
    layer = PAROAttention(density=density, block_size=BLOCK, causal=causal).calibrate(
        {0: (q, k)}, grid=GRID)["layers"]["0"]
    chosen = torch.stack([naive_masses(q, k, order_indices(GRID, name), causal)[h]
                          for h, name in enumerate(layer["orders"])])
    cand = torch.stack([naive_candidates(order_indices(GRID, name).tolist(), causal) for name in layer["orders"]])
    values = sorted(chosen[cand].tolist(), reverse=True)
    threshold = values[math.ceil(density * len(values)) - 1]
    kept = torch.tensor([[[c == "1" for c in row] for row in head] for head in layer["masks"]])
    want = (cand & (chosen >= threshold)) | torch.eye(cand.shape[1], dtype=torch.bool)
    clear = (chosen - threshold).abs() > 1e-6  # float32 vs float64 may order blocks at the threshold differently
    assert torch.equal(kept[clear], want[clear]) and clear.float().mean() > 0.95
    assert abs(float((kept & cand).sum() - cand.shape[1] * cand.shape[0]) / float(cand.sum()) - density) < 0.15


def test_plan_round_trip_is_used_as_is(tmp_path, monkeypatch):
    path = str(tmp_path / "paro.json")
    q, k = block_heads(ORDERS[::-1], batch=2, seed=1)
    plan = PAROAttention(density=0.3, block_size=BLOCK).calibrate({0: (q, k), 2: [(q[:1], k[:1])]}, grid=GRID,
                                                                   path=path)
    with open(path) as f:
        assert json.load(f) == plan
    loaded = load_plan(path)
    assert loaded["grid"] == GRID and sorted(loaded["tensors"]) == [0, 2]
    method = methods.get("paro", plan=path, block_size=BLOCK)
    # no online estimation once a plan is given
    boom = lambda *a, **kw: (_ for _ in ()).throw(AssertionError("estimated online"))  # noqa: E731
    monkeypatch.setattr(PAROAttention, "permutation", boom)
    monkeypatch.setattr(PAROAttention, "block_mask", boom)
    g = torch.Generator().manual_seed(5)
    fresh_q, fresh_k = torch.randn(2, 6, LENGTH, 8, generator=g), torch.randn(2, 3, LENGTH, 8, generator=g)
    mask = method.select(fresh_q, fresh_k, grid=GRID, layer=0).to_token_mask()
    assert torch.equal(method.select(q, k, grid=GRID, layer=0).to_token_mask(), mask)  # input-independent
    entry = plan["layers"]["0"]
    for h in range(6):
        position = torch.empty(LENGTH, dtype=torch.long)
        position[order_indices(GRID, entry["orders"][h])] = torch.arange(LENGTH)
        blocks = torch.tensor([[c == "1" for c in row] for row in entry["masks"][h]])
        want = blocks[position.view(-1, 1) // BLOCK, position.view(1, -1) // BLOCK]
        assert torch.equal(mask[0, h], want) and torch.equal(mask[1, h], want)
    # attend over the plan equals softmax attention restricted to that mask
    v = torch.randn(2, 3, LENGTH, 8, generator=g)
    out = method.attend(fresh_q, fresh_k, v, grid=GRID, layer=0, backend="torch")
    keys, values = fresh_k.repeat_interleave(2, 1).double(), v.repeat_interleave(2, 1).double()
    scores = (fresh_q.double() @ keys.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    assert torch.allclose(out.double(), torch.softmax(scores, -1) @ values, atol=1e-5)


def test_a_plan_that_does_not_fit_is_refused(tmp_path):
    path = str(tmp_path / "paro.json")
    q, k = block_heads(ORDERS, seed=2)
    plan = PAROAttention(block_size=BLOCK).calibrate({1: (q, k)}, grid=GRID, path=path)
    method = methods.get("paro", plan=path, block_size=BLOCK)
    with pytest.raises(ValueError, match="layer 0 is not in the plan"):
        method.select(q, k, grid=GRID, layer=0)
    with pytest.raises(ValueError, match="needs layer="):
        method.select(q, k, grid=GRID)
    with pytest.raises(ValueError, match="4 heads but the plan .* 6 heads"):
        method.select(q[:, :4], k[:, :4], grid=GRID, layer=1)
    with pytest.raises(ValueError, match="grid"):
        method.select(q, k, grid=(5, 4, 3), layer=1)
    with pytest.raises(ValueError, match="causal"):
        method.select(q, k, grid=GRID, layer=1, causal=True)
    with pytest.raises(ValueError, match="block_size=6"):
        methods.get("paro", plan=path)
    with pytest.raises(ValueError, match="plan .* cannot be read"):
        methods.get("paro", plan=str(tmp_path / "missing.json"), block_size=BLOCK)
    with pytest.raises(TypeError, match="plan"):
        methods.get("paro", plan=3, block_size=BLOCK)
    broken = {"not json": "{", "masks": dict(plan, layers={"1": dict(plan["layers"]["1"], masks=[["01"]] * 6)}),
              "orders": dict(plan, layers={"1": dict(plan["layers"]["1"], orders=["xyz"] * 6)}),
              "grid": dict(plan, grid=[3, 4])}
    for what, content in broken.items():
        bad = tmp_path / f"{what.replace(' ', '_')}.json"
        bad.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match="plan" if what == "not json" else what):
            methods.get("paro", plan=str(bad), block_size=BLOCK)
    with pytest.raises(TypeError, match="samples"):
        PAROAttention(block_size=BLOCK).calibrate([(q, k)], grid=GRID)
    with pytest.raises(ValueError, match="heads"):
        PAROAttention(block_size=BLOCK).calibrate({0: (q, k), 1: (q[:, :2], k[:, :2])}, grid=GRID)
    with pytest.raises(ValueError, match="grid"):
        PAROAttention(block_size=BLOCK).calibrate({0: (q, k)}, grid=(3, 4, 4))
