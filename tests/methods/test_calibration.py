"""Offline calibration (blockattn.methods.calibration): MInference's per-head pattern search against a
naive re-creation of its criterion on heads built to have one clear pattern each, the per-head
patterns against their uniform counterparts and naive rules, XAttention's profiled thresholds against a
float64 loop transcription of the official profiler, config files and the errors on bad ones."""
import json
import math

import pytest
import torch

from blockattn import methods
from blockattn.methods import calibration
from blockattn.methods.vertical_slash import VerticalSlash
from blockattn.methods.xattention import XAttention

L, D = 1024, 64
# a grid in which each pattern can win: A-shape 8 sinks + 300 local, vertical-slash 10 dynamic columns and
# diagonals past the forced ones, block-sparse 2 of 16 key blocks
GRID = (("stream_llm", 8, 300), ("vertical_and_slash", 40, 110), ("block_sparse", 8, 0))


def structured_heads(seed=0):
    """q [1, 3, L, D], k [1, 3, L, D]: head 0 A-shape (4 sinks + a ~120-token local window), head 1
    vertical-slash (4 columns at 600 + diagonals at offsets 200, 350 and 500), head 2 block-sparse (query
    block b attends key block b // 3)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(L, dtype=torch.float64)
    q, k = torch.zeros(3, L, D, dtype=torch.float64), torch.zeros(3, L, D, dtype=torch.float64)
    # head 0: a positional feature whose dot product decays with distance, and sink keys
    w, b = math.pi / L, 2.7  # exp(-(b w d)^2 / 2): a window of ~120 tokens (sigma)
    q[0, :, 1], q[0, :, 2] = b * torch.cos(w * pos), b * torch.sin(w * pos)
    k[0, 4:, 1], k[0, 4:, 2] = b * torch.cos(w * pos[4:]), b * torch.sin(w * pos[4:])
    q[0, :, 0], k[0, :4, 0] = 1.0, b * b + 1
    # head 1: random unit keys; each query points at the keys 200, 350 and 500 before it, and at 600..603
    r = torch.randn(L, D - 1, generator=g, dtype=torch.float64)
    r = r / r.norm(dim=-1, keepdim=True)
    k[1, :, 1:] = r
    for o in (200, 350, 500):
        q[1, o:, 1:] += 12 * r[:-o]
    k[1, 600:604, 0], q[1, :, 0] = 14.0, 1.0
    # head 2: orthonormal block codes
    codes = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0][:16]
    blocks = torch.arange(L) // 64
    k[2] = codes[blocks]
    q[2] = 10 * codes[blocks // 3]
    scale = D ** 0.5  # the method's logits are q.k / sqrt(D): pre-scale so the logits above are exact
    return (q * scale).float()[None], k.float()[None]


def naive_recall(q, k, mask, start):
    """Mean over query rows >= start of the float64 dense causal softmax mass inside `mask [H, L, L]`."""
    logits = (q[0].double() @ k[0].double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    probs = logits.softmax(-1)
    return (probs * mask).sum(-1)[:, start:].mean(-1)


def test_search_picks_each_heads_pattern_by_the_naive_criterion():
    q, k = structured_heads()
    chosen, recall, concrete = calibration.search_patterns(q, k, candidates=GRID, score_from=512)
    assert [p[0] for p in chosen] == ["stream_llm", "vertical_and_slash", "block_sparse"]
    # the criterion, plainly: each candidate's token mask, the dense mass it keeps, the first best
    naive = torch.stack([naive_recall(q, k, VerticalSlash().pattern_layout(q, k, [c] * 3).to_token_mask()[0], 512)
                         for c in concrete])
    assert torch.allclose(recall, naive, atol=1e-4)
    assert naive.argmax(0).tolist() == [0, 1, 2]
    assert (naive.max(0).values - naive.topk(2, 0).values[1] > 0.05).all()  # clear margins, not ties


def test_search_ties_go_to_the_earlier_candidate_and_short_prompts_score_the_second_half():
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16)
    grid = (("vertical_and_slash", 300, 300), ("stream_llm", 300, 300))  # both dense at 256 tokens
    chosen, recall, _ = calibration.search_patterns(q, k, candidates=grid, score_from=2500)
    assert torch.allclose(recall, torch.ones_like(recall), atol=1e-5)
    assert chosen == [("vertical_and_slash", 300, 300)] * 2


def test_grid_is_the_official_one_made_concrete():
    assert calibration.OFFICIAL_CANDIDATES == (
        ("stream_llm", 100, 800), ("vertical_and_slash", 30, 800), ("vertical_and_slash", 100, 750),
        ("vertical_and_slash", 500, 700), ("vertical_and_slash", 3500, 100), ("block_sparse", 8, 0))
    concrete = calibration.candidate_patterns(calibration.OFFICIAL_CANDIDATES, 4096, scale=0.5)
    assert concrete[0] == ("stream_llm", 50, 400) and concrete[4] == ("vertical_and_slash", 1750, 50)
    assert concrete[5] == ("block_sparse", 8, 0)  # 64 blocks // 8


def test_per_head_patterns_match_their_uniform_counterparts():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 700, 16), torch.randn(1, 2, 700, 16)
    patterns = [("vertical_and_slash", 40, 120), ("vertical_and_slash", 200, 60),
                ("vertical_and_slash", 31, 300), ("vertical_and_slash", 90, 51)]
    mixed = VerticalSlash().pattern_layout(q, k, patterns).to_token_mask()
    for h, (_, v, s) in enumerate(patterns):
        alone = VerticalSlash(vertical_size=v, slash_size=s).select(q[:, h:h + 1], k[:, h // 2:h // 2 + 1])
        assert torch.equal(mixed[:, h], alone.to_token_mask()[:, 0]), h


def test_a_shape_head_is_its_window_widened_by_less_than_one_range():
    q, k = torch.randn(1, 1, 600, 16), torch.randn(1, 1, 600, 16)
    mask = VerticalSlash().pattern_layout(q, k, [("stream_llm", 10, 100)]).to_token_mask()[0, 0]
    i, j = torch.arange(600).view(-1, 1), torch.arange(600).view(1, -1)
    exact = (j <= i) & ((j < 10) | (i - j < 100))
    assert (mask >= exact).all() and not (mask & (j > i)).any()
    assert not (mask & ~exact & (i - j >= 100 + 64)).any()


def test_block_sparse_head_matches_a_loop_over_pooled_blocks():
    torch.manual_seed(2)
    length, block = 300, 64
    q, k = torch.randn(1, 2, length, 8), torch.randn(1, 1, length, 8)
    mask = VerticalSlash().pattern_layout(q, k, [("block_sparse", 2, 0), ("block_sparse", 3, 0)]).to_token_mask()
    n = math.ceil(length / block)
    for h, top in ((0, 2), (1, 3)):
        qp = torch.stack([q[0, h, b * block:(b + 1) * block].double().mean(0) for b in range(n)])
        kp = torch.stack([k[0, 0, b * block:(b + 1) * block].double().mean(0) for b in range(n)])
        for b in range(n):
            scores = {c: float(qp[b] @ kp[c]) for c in range(b + 1)}
            keep = sorted(scores, key=scores.get, reverse=True)[:top]
            rows = slice(b * block, min(length, (b + 1) * block))
            expected = torch.zeros(length, dtype=torch.bool)
            for c in keep:
                expected[c * block:(c + 1) * block] = True
            for i in range(rows.start, rows.stop):
                assert torch.equal(mask[0, h, i], expected & (torch.arange(length) <= i)), (h, b, i)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_config_round_trip_and_per_layer_lookup(tmp_path):
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 512, 16), torch.randn(1, 1, 512, 16)
    layers = [[("vertical_and_slash", 40, 120), ("stream_llm", 16, 64)],
              [("block_sparse", 3, 0), ("vertical_and_slash", 100, 200)]]
    config = {"patterns": [[calibration._pattern_dict(p, 0.5) for p in layer] for layer in layers]}
    path = write(tmp_path, "vs.json", config)
    assert calibration.load_patterns(path) == layers
    method = methods.get("vertical_slash", config=path)
    for i, layer in enumerate(layers):
        got = method.select(q, k, layer=i).to_token_mask()
        assert torch.equal(got, VerticalSlash().pattern_layout(q, k, layer).to_token_mask())
    # heads really differ: layer 0's heads are not each other's pattern
    assert not torch.equal(method.select(q, k, layer=0).to_token_mask(),
                           VerticalSlash().pattern_layout(q, k, layers[0][::-1]).to_token_mask())


def test_official_minference_config_loads(tmp_path):
    official = [{"0": ["vertical_and_slash", 30, 800, 0.9], "2": ["block_sparse", 8, 1, 0.8]},
                {"0": ["stream_llm", 100, 800, 0.7], "1": ["vertical_and_slash", 3500, 100, 0.6]}]
    assert calibration.load_patterns(write(tmp_path, "official.json", official)) == [
        [("vertical_and_slash", 30, 800), ("vertical_and_slash", 1000, 6096), ("block_sparse", 100, 0)],
        [("stream_llm", 100, 800), ("vertical_and_slash", 3500, 100)]]


def test_bad_configs_are_value_errors_naming_the_argument(tmp_path):
    q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16)
    with pytest.raises(ValueError, match="config=.*no such file"):
        methods.get("vertical_slash", config=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="config.*pattern must be one of"):
        methods.get("vertical_slash", config=write(tmp_path, "a.json", {"patterns": [[{"pattern": "dense"}]]}))
    with pytest.raises(ValueError, match="config.*sizes must be ints"):
        methods.get("vertical_slash", config=write(tmp_path, "b.json", {"patterns": [[
            {"pattern": "vertical_and_slash", "vertical_size": -1, "slash_size": 3}]]}))
    path = write(tmp_path, "c.json", {"patterns": [[calibration._pattern_dict(("stream_llm", 4, 64), 1.0)] * 3]})
    method = methods.get("vertical_slash", config=path)
    with pytest.raises(ValueError, match="needs select\\(..., layer=i\\)"):
        method.select(q, k)
    with pytest.raises(ValueError, match="config=.*3 heads in layer 0 but q has 2"):
        method.select(q, k, layer=0)
    with pytest.raises(ValueError, match="layer 1 is past the 1 layers of config="):
        method.select(q, k, layer=1)
    with pytest.raises(ValueError, match="config= needs block_size <= 64"):
        methods.get("vertical_slash", config=path, block_size=128)
    with pytest.raises(TypeError, match="config must be a path"):
        methods.get("vertical_slash", config=3)


# ------------------------------------------------------------------------------------------ XAttention
def naive_profile(q, k, *, block, stride, coverage):
    """The official profiler, plainly: exact block sums of the float64 dense causal softmax, per row the
    fewest blocks covering `coverage`, the smallest antidiagonal score among them, the share at or above."""
    heads, length = q.shape[1], q.shape[2]
    n = math.ceil(length / block)
    logits = q[0].double() @ k[0].double().repeat_interleave(heads // k.shape[1], 0).transpose(-1, -2)
    logits = (logits / math.sqrt(q.shape[-1])).masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1),
                                                           float("-inf"))
    probs = logits.softmax(-1)
    estimate = XAttention(stride=stride, block_size=block).block_scores(q, k)[0].double()
    out = []
    for h in range(heads):
        exact = torch.tensor([[float(probs[h, r * block:(r + 1) * block, c * block:(c + 1) * block].sum())
                               for c in range(n)] for r in range(n)])
        kept = 0.0
        for r in range(n):
            order = sorted(range(n), key=lambda c: -exact[r, c])
            total, covered, chosen = float(exact[r].sum()), 0.0, []
            for c in order:
                chosen.append(c)
                covered += float(exact[r, c])
                if covered >= coverage * total:
                    break
            smallest = min(float(estimate[h, r, c]) for c in chosen)
            kept += float(estimate[h, r][estimate[h, r] >= smallest].sum())
        out.append(kept / float(estimate[h].sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_profiled_thresholds_match_the_official_rule():
    torch.manual_seed(4)
    q, k = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16)
    q[..., :4] *= 4  # some structure, so rows need different numbers of blocks
    method = XAttention(stride=4, block_size=32, onednn_scoring=False)
    got = calibration.profile_thresholds(method, q, k, coverage=0.9)[0]
    assert torch.allclose(got.double(), naive_profile(q, k, block=32, stride=4, coverage=0.9), atol=1e-4)
    assert ((got > 0) & (got <= 1)).all()


def test_xattention_thresholds_file_per_layer(tmp_path):
    torch.manual_seed(5)
    q, k = torch.randn(1, 3, 512, 16), torch.randn(1, 1, 512, 16)
    table = [[0.5, 0.9, 0.7], [0.95, 0.3, 0.8]]
    path = write(tmp_path, "x.json", {"stride": 8, "block_size": 64, "thresholds": table})
    method = methods.get("xattention", thresholds=path, block_size=64)
    for i, row in enumerate(table):
        expected = XAttention(threshold=tuple(row), block_size=64).select(q, k).to_dense()
        assert torch.equal(method.select(q, k, layer=i).to_dense(), expected)
    assert not torch.equal(method.select(q, k, layer=0).to_dense(), method.select(q, k, layer=1).to_dense())
    with pytest.raises(ValueError, match="needs select\\(..., layer=i\\)"):
        method.select(q, k)
    with pytest.raises(ValueError, match="layer 2 is past the 2 layers of thresholds="):
        method.select(q, k, layer=2)
    with pytest.raises(ValueError, match="thresholds=.*layer 0 has 3 per-head values but q has 2"):
        method.select(torch.randn(1, 2, 512, 16), k, layer=0)
    with pytest.raises(ValueError, match="calibrated with block_size=64"):
        methods.get("xattention", thresholds=path)  # block_size 128
    with pytest.raises(ValueError, match="thresholds=.*no such file"):
        methods.get("xattention", thresholds=str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="thresholds\\[1\\]\\[0\\]"):
        methods.get("xattention", thresholds=write(tmp_path, "y.json", {"thresholds": [[0.5], [1.5]]}))
