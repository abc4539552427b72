"""SAE circuit identification and circuit reuse: synthetic planted heads, the SAE's constraints, prompt
generators, head results against an eager twin on a tiny random Llama, overlap on hand-made sets."""
import pytest
import torch

from blockattn.analysis import circuit_reuse, circuits

from .tiny_lm import WordTokenizer, o_proj_io, tiny_llama


def planted(seed, n_pos=10, n_neg=10, heads=12, d=16, star=7):
    """Every head writes its own fixed vector (+ small noise) on every prompt; head `star` adds a large
    distinct direction only on positives."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(heads, d, generator=g) * 2
    x = base.expand(n_pos + n_neg, heads, d) + 0.01 * torch.randn(n_pos + n_neg, heads, d, generator=g)
    x = x.clone()
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    x[:n_pos, star] += 6 * direction
    return x


def test_planted_head_ranks_first():
    x = planted(0)
    ranking = circuits.rank_heads(x, 10, heads=4)  # the official schedule: 500 epochs on 10 examples
    assert ranking.order[0] == divmod(7, 4)
    assert ranking.scores.shape == (3, 4)
    assert float(ranking.scores.flatten()[7]) >= 1 and float(ranking.scores.flatten().sort().values[-2]) == 0


def test_codes_are_ints_in_range_and_unit_norm_holds():
    x = planted(3)
    sae = circuits.train_sae(x[[0, 1, 2, 3, 4, 10, 11, 12, 13, 14]], epochs=20)
    codes = circuits.sae_codes(sae, x)
    assert codes.dtype == torch.long and codes.shape == (20, 12)
    assert int(codes.min()) >= 0 and int(codes.max()) < circuits.FEATURES
    for layer in (sae.encoder, sae.decoder):
        torch.testing.assert_close(layer.weight.norm(dim=-1), torch.ones(layer.weight.shape[0]), atol=1e-5, rtol=0)
    # the backward hook leaves only the gradient orthogonal to each weight row
    acts, recon = sae(x)
    sae.zero_grad()
    circuits.sae_loss(acts, recon, x).backward()
    w, grad = sae.encoder.weight.detach(), sae.encoder.weight.grad
    assert float((grad * w).sum(-1).abs().max()) < 1e-5 * max(1.0, float(grad.abs().max()))


def test_sae_loss_is_mse_plus_mean_l1():
    acts, recon, x = torch.rand(3, 5, 7), torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    want = ((recon - x) ** 2).mean() + 0.02 * acts.abs().sum(-1).mean()
    torch.testing.assert_close(circuits.sae_loss(acts, recon, x), want)


def test_node_and_edge_scores_by_hand():
    codes = torch.tensor([[1, 5, 2], [3, 5, 2], [1, 5, 2],   # positives
                          [1, 5, 4], [1, 6, 4]])             # negatives
    assert circuits.node_scores(codes, 3).tolist() == [1.0, 0.0, 1.0]  # head 0: {1,3}-{1}; head 2: {2}-{4}
    assert circuits.node_scores(codes, 3, normalise=True).tolist() == [0.5, 0.0, 0.5]
    edges = circuits.edge_scores(codes, 3)
    assert torch.equal(edges, edges.T) and torch.equal(edges.diagonal(), circuits.node_scores(codes, 3))
    assert float(edges[0, 1]) == 1.0  # pairs (1,5), (3,5) on positives; (1,5) also on negatives
    with pytest.raises(ValueError, match="n_positive"):
        circuits.node_scores(codes, 5)


def test_words_are_single_tokens_for_smollm2():
    import os

    transformers = pytest.importorskip("transformers")
    from blockattn import models
    folder = os.path.join(models.cache_dir(), "smollm2-135m")
    if not os.path.exists(os.path.join(folder, "config.json")):
        models.load("smollm2-135m")  # converts the packaged GGUF into the cache once
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)  # the tokenizer alone: no weights loaded
    for word in (*circuits.NAMES, *circuits.COLORS):
        circuits.word_id(tokenizer, word)  # raises unless " word" is one token
    with pytest.raises(ValueError, match="tokens"):
        circuits.word_id(tokenizer, "Bartholomew-Smithers")


def test_overlap_on_hand_made_sets():
    a, b = {(1, 2), (3, 4), (5, 6), (7, 8)}, {(3, 4), (7, 8), (9, 0)}
    o = circuit_reuse.overlap(a, b)
    assert o["intersection"] == 2 and o["jaccard"] == 2 / 5 and o["of_a"] == 2 / 4
    assert circuit_reuse.overlap(a, a)["jaccard"] == 1.0 and circuit_reuse.overlap(a, {(0, 0)})["jaccard"] == 0.0
    assert circuit_reuse.chance_overlap(27, 270) == pytest.approx(2.7)
    with pytest.raises(ValueError, match="non-empty"):
        circuit_reuse.overlap(set(), b)
    ranking_a = circuits.Ranking(torch.zeros(30, 9), [(12, 1), (2, 0), (15, 3), (11, 4), (25, 5)])
    ranking_b = circuits.Ranking(torch.zeros(30, 9), [(15, 3), (2, 0), (12, 1), (25, 5), (0, 0)])
    assert circuit_reuse.shared_mid_heads(ranking_a, ranking_b, 5, 30) == [(12, 1), (15, 3)]


# --------------------------------------------------------------------------- on a tiny random Llama
def test_head_results_sum_to_o_proj_output_and_split_by_head():
    model, tok = tiny_llama(), WordTokenizer()
    prompts = circuits.ioi_prompts(4, "ABBA")[:1] * 1 + circuits.ioi_prompts(4, "BABA")[:3]
    got = circuits.head_results(model, tok, prompts, position="last")
    mean = circuits.head_results(model, tok, prompts)  # the official default: averaged over positions
    assert got.shape == mean.shape == (4, 8, 32)
    for i, p in enumerate(prompts):
        seen = o_proj_io(model, torch.tensor([tok(p.text).input_ids]))
        for layer in range(2):
            x, y = seen[layer]
            w = model.model.layers[layer].self_attn.o_proj.weight
            want = torch.stack([x[0, -1, h * 8:(h + 1) * 8] @ w[:, h * 8:(h + 1) * 8].T for h in range(4)])
            torch.testing.assert_close(got[i, layer * 4:(layer + 1) * 4], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[i, layer * 4:(layer + 1) * 4].sum(0), y[0, -1], atol=1e-5, rtol=1e-5)
            # TransformerLens `stack_head_results` then `.mean(dim=2)` over positions (data_utils.py)
            per_position = torch.stack([x[0, :, h * 8:(h + 1) * 8] @ w[:, h * 8:(h + 1) * 8].T for h in range(4)])
            torch.testing.assert_close(mean[i, layer * 4:(layer + 1) * 4], per_position.mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="position"):
        circuits.head_results(model, tok, prompts, position="first")


def logits_with_o_proj_input_set(model, ids, layer, columns, value, *, positions):
    """The naive twin of mean-ablation: last-position logits with layer `layer`'s o_proj input set to
    `value` at `positions` in `columns` (one head's slice), by a plain forward pre-hook."""
    def pre(module, args):
        x = args[0].clone()
        x[:, positions, columns] = value
        return (x,)
    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return model(ids).logits[0, -1]
    finally:
        handle.remove()


def test_mean_ablation_edits_only_the_last_position():
    model, tok = tiny_llama(), WordTokenizer()
    prompts = circuits.ioi_prompts(3, "ABBA")
    means = circuits.last_position_means(model, tok, prompts)
    assert means.shape == (2, 4, 8)
    plain = circuits.last_logits(model, tok, prompts)
    ablated = circuits.last_logits(model, tok, prompts, edits=circuits.mean_ablation([(1, 2)], means))
    assert not torch.allclose(plain, ablated)
    # the naive twin: replace the o_proj input slice of head 2, layer 1, at the last position only
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p.text).input_ids])
        want = logits_with_o_proj_input_set(model, ids, 1, slice(16, 24), means[1, 2], positions=-1)
        torch.testing.assert_close(ablated[i], want, atol=1e-5, rtol=1e-5)


def test_every_position_mean_ablation_and_attribution_baseline():
    model, tok = tiny_llama(), WordTokenizer()
    prompts = circuits.ioi_prompts(2, "BABA")
    means = circuits.last_position_means(model, tok, prompts, every_position=True)
    ablated = circuits.last_logits(model, tok, prompts,
                                   edits=circuits.mean_ablation([(0, 1)], means, every_position=True))
    ids = torch.tensor([tok(prompts[0].text).input_ids])
    want = logits_with_o_proj_input_set(model, ids, 0, slice(8, 16), means[0, 1], positions=slice(None))
    torch.testing.assert_close(ablated[0], want, atol=1e-5, rtol=1e-5)
    # attribution: a result planted along the (gain-weighted) answer - foil unembedding ranks first
    results = torch.zeros(2, 8, 32)
    for i, p in enumerate(prompts):
        w = model.get_output_embeddings().weight
        results[i, 6] = (w[circuits.word_id(tok, p.answer)] - w[circuits.word_id(tok, p.foil)]).detach()
    ranking = circuits.logit_attribution_ranking(model, tok, results, prompts, heads=4)
    assert ranking.order[0] == (1, 2) and ranking.scores.shape == (2, 4)
