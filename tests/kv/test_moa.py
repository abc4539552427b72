"""MoA: the influence formula (exact for a loss linear in A), the profile's gradients against eager
autograd, MoA's layout/cache-size rules, the exact budgeted choice, and the per-head elastic cache."""
import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import kv  # noqa: E402
from blockattn.kv import moa, moa_calibrate as cal  # noqa: E402
from tests.kv.common import VOCAB, Oracle, decode, rel, tiny_llama  # noqa: E402


def naive_blocks(attn, grad, block):
    """attn, grad [L, L] float64 for one head -> Σ|ΔL| per block, ΔL by removing each entry and renormalising
    its row (for a loss linear in A the first-order formula is exact)."""
    n = attn.shape[0]
    delta = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1):
            if i == 0:
                delta[i, j] = attn[i, j] * grad[i, j]
                continue
            new = attn[i].clone()
            new[j] = 0
            new = new / new.sum()
            delta[i, j] = ((new - attn[i]) * grad[i]).sum()
    nb = n // block
    return delta.abs().view(nb, block, nb, block).sum((1, 3))


def test_influence_blocks_equal_brute_force_removal():
    n, d, block = 12, 4, 3
    q, grad_out = torch.randn(2, n, d, dtype=torch.float64), torch.randn(2, n, d, dtype=torch.float64)
    k, v = torch.randn(1, n, d, dtype=torch.float64), torch.randn(1, n, d, dtype=torch.float64)
    got = cal.influence_blocks(q, k, v, grad_out, d ** -0.5, block)
    expected = 0
    for h in range(2):
        logits = (q[h] @ k[0].T * d ** -0.5).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        expected = expected + naive_blocks(logits.softmax(-1), grad_out[h] @ v[0].T, block)
    assert torch.allclose(got[0].double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_profile_gradients_match_eager_autograd(checkpoint):
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    ids = torch.randint(0, VOCAB, (1, 16))
    got = cal.influence_on(model, ids, 10, block=4, checkpoint=checkpoint)
    assert all("forward" not in vars(m) for m in model.modules())     # the recompute wrappers are gone
    eager = transformers.LlamaForCausalLM(model.config).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    out = eager(ids, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    torch.nn.functional.cross_entropy(out.logits[0, 9:-1], ids[0, 10:]).backward()
    for layer, attn in enumerate(out.attentions):
        expected = torch.zeros(2, 4, 4, dtype=torch.float64)
        for h in range(4):
            expected[h // 2] += naive_blocks(attn[0, h].double().detach(), attn.grad[0, h].double(), 4)
        assert torch.allclose(got[layer].double(), expected, rtol=1e-3, atol=1e-8)


def test_layout_cache_size_and_grid_rules():
    layout = moa.block_layout(0, 0.5, 8)
    assert layout[-1].tolist() == [True, False, False, False, True, True, True, True]   # density 5/8
    assert moa.block_layout(-2048, 0.0, 8)[-1].sum() == 2                              # diagonal + sink
    assert moa.cache_size(0, 0.1, 500, max_new=0) == 128                               # floor
    assert moa.cache_size(100, 0.5, 1000, max_new=0) == 640                            # 600 → 64·10
    assert moa.cache_size(0, 1.0, 1000, max_new=1024) == 2048                          # capped at N + max_new
    configs = cal.grid([2048, 4096], 8192)
    assert {a for a, _ in configs} <= {-2048, -1024, 0, 1024, 2048, 3072, 4096}
    assert all(a + b * 4096 <= 4096 and a + b * 2048 > 0 for a, b in configs)


def test_choice_is_the_budgeted_optimum():
    torch.manual_seed(1)
    loss, cost = torch.rand(4, 3), torch.tensor([1, 2, 4])
    for budget in (4, 7, 10, 16):
        chosen = cal.choose(loss, cost, budget)
        best = min((sum(float(loss[h, c]) for h, c in enumerate(combo)), combo)
                   for combo in itertools.product(range(3), repeat=4) if sum(int(cost[c]) for c in combo) <= budget)
        assert sum(int(cost[c]) for c in chosen) <= budget
        assert abs(sum(float(loss[h, c]) for h, c in enumerate(chosen)) - best[0]) < 1e-9
    with pytest.raises(ValueError, match="no plan fits"):
        cal.choose(loss, cost, 3)


def test_elastic_per_head_cache_against_the_oracle():
    model = tiny_llama(layers=2, kv_heads=2)
    plan = {"spans": {"0.5": [[[0, 0.25], [0, 0.75]], [[-64, 0.5], [0, 1.0]]]}}
    policy = kv.get("moa", plan=plan, ratio=0.5, sink=4, min_cache=8, block=4, max_new=0)
    ids = torch.randint(0, VOCAB, (1, 100))
    logits, fed, attended, cache = decode(model, ids, 4, policy)
    # spans 25, 75 → rounded up to 28, 76; −64 + 50 → the floor of 8; β = 1 keeps everything and grows
    assert cache.lengths() == [[28, 76], [8, 104]]
    expected = Oracle(model).logits(ids, fed, attended)
    assert rel(logits, expected) < 1e-5
    with pytest.raises(ValueError, match="no plan for density"):
        kv.get("moa", plan=plan, ratio=0.7).spans()
    with pytest.raises(ValueError, match="must exceed the sink"):
        kv.get("moa", ratio=0.5, sink=64, min_cache=64)


def test_calibrate_profiles_only_the_lengths_it_lacks(monkeypatch):
    model = tiny_llama(layers=2, kv_heads=2)
    profiled = []

    def fake_profile(model, tokenizer, n, samples, seed=0, checkpoint=False):
        profiled.append((n, checkpoint))
        return torch.rand(2, 2, n // 64, n // 64)

    monkeypatch.setattr(cal, "profile", fake_profile)
    saved = {1024: torch.rand(2, 2, 16, 16), 4096: torch.rand(2, 2, 64, 64)}
    plan = cal.calibrate(model, None, lengths=(1024, 2048), influence=saved, densities=(0.5,), checkpoint=True)
    assert profiled == [(2048, True)]
    assert sorted(plan["influence"]) == [1024, 2048] and plan["influence"][1024] is saved[1024]
    assert plan["loss"]["0.5"] >= 0 and len(plan["spans"]["0.5"]) == 2
    with pytest.warns(UserWarning, match="not informed by the profile"):   # a budget beyond the profile
        cal.calibrate(model, None, lengths=(1024, 2048), influence=saved | plan["influence"], densities=(0.5,),
                      budget_length=4096)
