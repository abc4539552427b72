"""Landmark Attention: the bias-folded single softmax and the retrieval merge equal the two-level grouped
softmax written plainly; retrieval reads only the chosen blocks; data helpers place and skip landmarks."""
import pytest
import torch

from blockattn.modules.landmark import (grouped_softmax_attention, insert_landmarks, landmark_retrieval,
                                        landmark_targets, retrieve_blocks)


def naive_grouped_weights(q, k, block_size, allowed_blocks=None):
    """P [L, L] of one head, the two-level form: a top-level softmax over the own block's regular tokens
    j <= i and the landmarks of earlier (allowed) blocks, each block's weight spread by a softmax over
    its regular tokens. `allowed_blocks[i]`: the earlier blocks query i may use (default: all)."""
    length, dim = q.shape
    scale = dim ** -0.5
    s = q @ k.T * scale
    P = torch.zeros(length, length, dtype=q.dtype)
    for i in range(length):
        c = i // block_size
        own = [j for j in range(c * block_size, i + 1) if j % block_size != block_size - 1]
        past = list(range(c)) if allowed_blocks is None else list(allowed_blocks[i])
        top = torch.softmax(torch.stack([s[i, j] for j in own] + [s[i, g * block_size + block_size - 1]
                                                                  for g in past]), 0)
        for j, p in zip(own, top):
            P[i, j] = p
        for g, beta in zip(past, top[len(own):]):
            regular = list(range(g * block_size, (g + 1) * block_size - 1))
            P[i, regular] = beta * torch.softmax(s[i, regular], 0)
    return P


def _inputs(length, heads_q=4, heads_kv=2, dim=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, length, dim, generator=gen, dtype=dtype) for h in (heads_q, heads_kv, heads_kv)]


@pytest.mark.parametrize("length", [40, 45])
def test_bias_fold_equals_two_level_form(length):
    q, k, v = _inputs(length, seed=length)
    out = grouped_softmax_attention(q.float(), k.float(), v.float(), block_size=5)
    for b in range(2):
        for h in range(4):
            P = naive_grouped_weights(q[b, h], k[b, h // 2], 5)
            torch.testing.assert_close(out[b, h].double(), P @ v[b, h // 2], rtol=1e-5, atol=1e-5)


def test_weights_sum_to_one_and_landmark_values_unread():
    q, k, _ = _inputs(40, heads_q=2, heads_kv=2, seed=1)
    eye = torch.eye(40, dtype=torch.float64).expand(2, 2, 40, 40).contiguous()
    pad = (0, 32)  # zero channels up to D = L, the scale given explicitly
    P = grouped_softmax_attention(*(torch.nn.functional.pad(t, pad) for t in (q, k)), eye, block_size=5,
                                  scale=8 ** -0.5)
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 2, 40, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert bool((P[..., 4::5] == 0).all()), "a landmark's value was read"
    assert bool((P.triu(1) == 0).all())
    for h in range(2):
        torch.testing.assert_close(P[0, h], naive_grouped_weights(q[0, h], k[0, h], 5), rtol=1e-6, atol=1e-7)


def test_equal_keys_in_a_block_spread_its_weight_evenly():
    q, k, _ = _inputs(20, heads_q=1, heads_kv=1, seed=2)
    k[..., 0:4, :] = k[..., 0:1, :]  # block 0's regular keys all equal
    eye = torch.eye(20, dtype=torch.float64).expand(2, 1, 20, 20).contiguous()
    P = grouped_softmax_attention(*(torch.nn.functional.pad(t, (0, 12)) for t in (q, k)), eye, block_size=5,
                                  scale=8 ** -0.5)
    torch.testing.assert_close(P[..., 5:, 0:4], P[..., 5:, 0:1].expand(-1, -1, -1, 4))


def test_retrieval_with_every_block_equals_full_grouped_softmax():
    q, k, v = _inputs(45, seed=3)
    full = grouped_softmax_attention(q, k, v, block_size=5)
    for aggregate in ("per_token", "max_over_tokens"):
        torch.testing.assert_close(landmark_retrieval(q, k, v, block_size=5, top_k=9, aggregate=aggregate), full,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("aggregate", ["per_token", "max_over_tokens"])
def test_retrieval_top_k_equals_grouped_softmax_over_the_chosen_blocks(aggregate):
    q, k, v = _inputs(40, seed=4)
    out, blocks = landmark_retrieval(q.float(), k.float(), v.float(), block_size=5, top_k=2, aggregate=aggregate,
                                     return_blocks=True)
    scale = 8 ** -0.5
    for b in range(2):
        for h in range(4):
            logits = q[b, h] @ k[b, h // 2, 4::5].T * scale  # [L, nb]
            chosen = []
            for i in range(40):
                c = i // 5
                if aggregate == "per_token":
                    scores = torch.softmax(logits[i, :c], 0) if c else torch.zeros(0)
                    best = scores.argsort(descending=True)[:2].tolist()
                    assert sorted(best) == sorted(g for g in blocks[b, h, i].tolist() if g >= 0)
                else:
                    rows = range(c * 5, c * 5 + 5)
                    scores = torch.stack([torch.softmax(logits[r, :c], 0) for r in rows]).amax(0) if c else \
                        torch.zeros(0)
                    best = scores.argsort(descending=True)[:2].tolist()
                    assert sorted(best) == sorted(g for g in blocks[b, h, c].tolist() if g >= 0)
                chosen.append(best)
            P = naive_grouped_weights(q[b, h], k[b, h // 2], 5, chosen)
            torch.testing.assert_close(out[b, h].double(), P @ v[b, h // 2], rtol=1e-5, atol=1e-5)


def test_retrieve_blocks_local_only():
    q, k, _ = _inputs(20, seed=5)
    assert retrieve_blocks(q, k, block_size=5, top_k=0).shape[-1] == 0


def test_gradients_flow_to_landmark_keys_and_match_the_two_level_form():
    q, k, v = (t.requires_grad_() for t in _inputs(20, heads_q=2, heads_kv=1, seed=6))
    grouped_softmax_attention(q, k, v, block_size=5, backend="torch").square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out = torch.stack([torch.stack([naive_grouped_weights(q[b, h], k[b, 0], 5) @ v[b, 0] for h in range(2)])
                       for b in range(2)])
    out.square().sum().backward()
    assert float(k.grad[..., 4::5, :].abs().sum()) > 0, "landmark keys get no gradient"
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_insert_landmarks_and_targets():
    tokens = torch.arange(1, 10).view(1, 9)
    stream = insert_landmarks(tokens, block_size=4, landmark_id=0)
    assert stream.tolist() == [[1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0]]
    targets = landmark_targets(stream, landmark_id=0)
    assert targets.tolist() == [[2, 3, 4, -100, 5, 6, 7, -100, 8, 9, -100, -100]]


def test_bad_input():
    q, k, v = _inputs(20)
    with pytest.raises(ValueError, match="block_size"):
        grouped_softmax_attention(q, k, v, block_size=1)
    with pytest.raises(ValueError, match="top_k"):
        landmark_retrieval(q, k, v, block_size=5, top_k=-1)
    with pytest.raises(ValueError, match="aggregate"):
        landmark_retrieval(q, k, v, block_size=5, aggregate="max_over_heads")
    with pytest.raises(ValueError, match="head dim"):
        grouped_softmax_attention(*_inputs(600, dim=8), block_size=2)
    with pytest.raises(ValueError, match="same length"):
        grouped_softmax_attention(q, k[:, :, :10], v[:, :, :10], block_size=5)


def test_task_places_pairs_and_queries():
    from blockattn.modules.landmark_train import LANDMARK, LandmarkTask
    task = LandmarkTask()
    stream, targets, pair_block = task.sample(8, torch.Generator().manual_seed(0))
    assert stream.shape == (8, 256) and bool((stream[:, 15::16] == LANDMARK).all())
    scored = targets >= 0
    assert int(scored.sum()) == 8 * 4 and bool((pair_block[scored] <= 13).all())
    for b, i in scored.nonzero().tolist():
        block = int(pair_block[b, i])
        key_at = (stream[b, block * 16:block * 16 + 15] == stream[b, i]).nonzero()
        assert len(key_at) == 1 and int(stream[b, block * 16 + int(key_at) + 1]) == int(targets[b, i])
    with pytest.raises(ValueError, match="pairs"):
        LandmarkTask(blocks=4, pairs=4)


def test_training_is_seeded_and_cli_writes_table_and_png(tmp_path):
    from blockattn.cli import main
    from blockattn.modules.landmark_train import LandmarkTask, train
    task = LandmarkTask(blocks=4, block_size=8, pairs=2, queries=2)
    first, second = (train(steps=3, batch=2, eval_sequences=10, task=task) for _ in range(2))
    assert first["losses"] == second["losses"] and set(first["accuracy"]) >= {"full grouped softmax", "own block only"}
    assert main(["train", "landmark", "--tiny", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "landmark.json").exists() and (tmp_path / "landmark.png").exists()
    assert main(["train", "landmark", "--steps", "0", "--out", str(tmp_path)]) == 2  # one error line
