"""BlockLayout: constructors against naive definitions, algebra properties, validation errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blockattn
from blockattn import BlockLayout


def naive_token_mask(blocks, q_len, k_len, block_q, block_k, causal=False, window=None):
    """Loop over positions: the token mask a block matrix plus analytic rule define."""
    mask = torch.zeros(blocks.shape[0], blocks.shape[1], q_len, k_len, dtype=torch.bool)
    offset = k_len - q_len
    for b in range(blocks.shape[0]):
        for h in range(blocks.shape[1]):
            for i in range(q_len):
                for j in range(k_len):
                    ok = bool(blocks[b, h, i // block_q, j // block_k])
                    if causal:
                        ok &= j <= i + offset
                    if window is not None:
                        ok &= i + offset - window[0] <= j <= i + offset + window[1]
                    mask[b, h, i, j] = ok
    return mask


@pytest.mark.parametrize("q_len,k_len,block_q,block_k,causal,window", [
    (37, 37, 8, 8, True, None), (20, 45, 8, 16, True, None), (45, 20, 16, 8, True, None),
    (33, 50, 16, 8, False, (5, 3)), (33, 50, 8, 8, True, (10, 0)), (17, 17, 32, 32, False, None)])
def test_from_dense_matches_naive_definition(q_len, k_len, block_q, block_k, causal, window):
    g = torch.Generator().manual_seed(q_len * k_len)
    blocks = torch.rand(1, 2, -(-q_len // block_q), -(-k_len // block_k), generator=g) < 0.6
    layout = BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                                    causal=causal, window=window, allow_empty_rows=True)
    expected = naive_token_mask(blocks, q_len, k_len, block_q, block_k, causal, window)
    assert torch.equal(layout.to_token_mask(), expected)
    # tiles the rule empties are not listed, so they are never computed
    tile_any = expected.view(1, 2, q_len, k_len).any(-1)
    assert layout.row_has_keys().equal(tile_any)
    assert (layout.to_dense() <= blocks).all()


@settings(max_examples=60, deadline=None)
@given(q_len=st.integers(1, 40), k_len=st.integers(1, 40), block_q=st.sampled_from([4, 8, 16]),
       block_k=st.sampled_from([4, 8, 16]), causal=st.booleans(), windowed=st.booleans(),
       seed=st.integers(0, 10_000))
def test_row_has_keys_matches_token_mask(q_len, k_len, block_q, block_k, causal, windowed, seed):
    # analytic layouts without a window take a per-block shortcut; it must agree with the token rule
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(2, 1, -(-q_len // block_q), -(-k_len // block_k), generator=g) < 0.5
    window = (3, 2) if windowed else None
    layout = BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                                    causal=causal, window=window, allow_empty_rows=True)
    expected = naive_token_mask(blocks, q_len, k_len, block_q, block_k, causal, window).any(-1)
    assert torch.equal(layout.row_has_keys(), expected)


def test_lists_without_slots_have_no_keys():
    counts, indices = torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 0, dtype=torch.int32)
    layout = BlockLayout(counts, indices, q_len=10, k_len=10, block_q=8, block_k=8, causal=True,
                         allow_empty_rows=True)
    assert not layout.row_has_keys().any()
    with pytest.raises(ValueError, match="attends to no key"):
        BlockLayout(counts, indices, q_len=10, k_len=10, block_q=8, block_k=8, causal=True)


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(1, 40), k_len=st.integers(1, 40), block_q=st.sampled_from([4, 8, 16]),
       block_k=st.sampled_from([4, 8, 16]), seed=st.integers(0, 10_000), density=st.floats(0.05, 0.9))
def test_from_token_mask_round_trips(q_len, k_len, block_q, block_k, seed, density):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, 1, q_len, k_len, generator=g) < density
    layout = BlockLayout.from_token_mask(mask, block_q=block_q, block_k=block_k, allow_empty_rows=True)
    assert torch.equal(layout.to_token_mask(), mask)
    assert torch.equal(layout.row_has_keys(), mask.any(-1))
    assert layout.token_density() == pytest.approx(mask.float().mean().item())


def test_from_token_mask_accepts_mask_mod_without_dense_mask():
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx) % (h + 2) == 0)
    layout = BlockLayout.from_token_mask(mask_mod, q_len=50, k_len=50, heads=3, block_q=16, block_k=16)
    i = torch.arange(50).view(-1, 1)
    j = torch.arange(50).view(1, -1)
    expected = torch.stack([(j <= i) & ((i - j) % (h + 2) == 0) for h in range(3)])[None]
    assert torch.equal(layout.to_token_mask(), expected)
    assert layout.tile_masks is not None and layout.tile_masks.shape[0] <= int(layout.kv_counts.sum())


def _random_layout(seed, kind):
    g = torch.Generator().manual_seed(seed)
    q_len, k_len = 30 + seed % 7, 41
    if kind == "mask":
        return BlockLayout.from_token_mask(torch.rand(1, 2, q_len, k_len, generator=g) < 0.3, block_q=8, block_k=8,
                                           allow_empty_rows=True)
    blocks = torch.rand(1, 2, 4 + (q_len > 32), 6, generator=g) < 0.5
    return BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=8, block_k=8,
                                  causal=kind == "causal", window=(6, 2) if kind == "window" else None,
                                  allow_empty_rows=True)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), kind_a=st.sampled_from(["plain", "causal", "window", "mask"]),
       kind_b=st.sampled_from(["plain", "causal", "window", "mask"]))
def test_union_and_intersection_are_tokenwise(seed, kind_a, kind_b):
    a = _random_layout(seed, kind_a)
    b = _random_layout(seed, kind_b)
    ma, mb = a.to_token_mask(), b.to_token_mask()
    assert torch.equal((a | b).to_token_mask(), ma | mb)
    assert torch.equal((a & b).to_token_mask(), ma & mb)
    assert torch.equal((a | b).to_token_mask(), (b | a).to_token_mask())


def test_density_against_full_and_causal():
    blocks = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    causal = BlockLayout.from_dense(blocks, q_len=64, k_len=64, block_q=16, block_k=16, causal=True)
    assert causal.density() == pytest.approx(10 / 16)
    assert causal.density("causal") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="relative_to"):
        causal.density("diagonal")


def test_transpose_lists_query_blocks_per_key_block():
    g = torch.Generator().manual_seed(3)
    blocks = torch.rand(1, 2, 5, 7, generator=g) < 0.5
    layout = BlockLayout.from_dense(blocks, q_len=40, k_len=56, block_q=8, block_k=8, allow_empty_rows=True)
    counts, indices, mask_ids = layout.transpose()
    assert mask_ids is None
    for h in range(2):
        for kb in range(7):
            listed = indices[0, h, kb, :counts[0, h, kb]].tolist()
            assert listed == blocks[0, h, :, kb].nonzero().flatten().tolist()


def test_show_writes_png(tmp_path):
    layout = _random_layout(1, "mask")
    path = layout.show(str(tmp_path / "layout.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs,message", [
    (dict(kv_counts=torch.tensor([[[1, 1]]]), kv_indices=torch.tensor([[[[0], [5]]]])), "out of range"),
    (dict(kv_counts=torch.tensor([[[2, 1]]]), kv_indices=torch.tensor([[[[1, 0], [0, -1]]]])), "increasing"),
    (dict(kv_counts=torch.tensor([[[1, 1, 1]]]), kv_indices=torch.tensor([[[[0], [0], [0]]]])), "nQ=2"),
    (dict(kv_counts=torch.tensor([[[1.0, 1.0]]]), kv_indices=torch.tensor([[[[0], [0]]]])), "integer tensor"),
    (dict(kv_counts=torch.tensor([[[3, 1]]]), kv_indices=torch.tensor([[[[0], [0]]]])), "kv_counts"),
    (dict(kv_counts=torch.tensor([[[0, 1]]]), kv_indices=torch.tensor([[[[0], [0]]]])), "attends to no key"),
])
def test_constructor_rejects_bad_block_lists(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockLayout(**kwargs, q_len=16, k_len=16, block_q=8, block_k=8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q_len=0), "q_len"), (dict(block_q=0), "block_q"), (dict(window=(-1, 2)), "window"),
    (dict(window=5), "window"), (dict(causal="yes"), "causal")])
def test_from_dense_rejects_bad_arguments(kwargs, message):
    args = dict(q_len=16, k_len=16, block_q=8, block_k=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        BlockLayout.from_dense(torch.ones(2, 2, dtype=torch.bool), **args)


def test_from_dense_rejects_wrong_shape_and_dtype():
    with pytest.raises(ValueError, match="nQ=2, nK=2"):
        BlockLayout.from_dense(torch.ones(3, 2, dtype=torch.bool), q_len=16, k_len=16, block_q=8, block_k=8)
    with pytest.raises(ValueError, match="bool"):
        BlockLayout.from_dense(torch.ones(2, 2), q_len=16, k_len=16, block_q=8, block_k=8)


def test_union_rejects_mismatched_layouts():
    a = BlockLayout.from_dense(torch.ones(2, 2, dtype=torch.bool), q_len=16, k_len=16, block_q=8, block_k=8)
    b = BlockLayout.from_dense(torch.ones(3, 2, dtype=torch.bool), q_len=24, k_len=16, block_q=8, block_k=8)
    with pytest.raises(ValueError, match="shapes differ"):
        a | b
    with pytest.raises(TypeError, match="BlockLayout"):
        a & "causal"


def test_transpose_carries_explicit_mask_ids():
    g = torch.Generator().manual_seed(5)
    layout = BlockLayout.from_token_mask(torch.rand(1, 2, 40, 56, generator=g) < 0.3, block_q=8, block_k=8,
                                         allow_empty_rows=True)
    counts, indices, mask_ids = layout.transpose()
    forward = {}
    for h in range(2):
        for qb in range(layout.num_q_blocks):
            for slot in range(int(layout.kv_counts[0, h, qb])):
                forward[h, qb, int(layout.kv_indices[0, h, qb, slot])] = int(layout.tile_mask_ids[0, h, qb, slot])
    backward = {(h, int(indices[0, h, kb, s]), kb): int(mask_ids[0, h, kb, s])
                for h in range(2) for kb in range(layout.num_k_blocks) for s in range(int(counts[0, h, kb]))}
    assert forward == backward and any(v >= 0 for v in forward.values())


def test_to_same_device_and_expand_to_own_shape_return_the_layout_itself():
    layout = blockattn.patterns.random_blocks(256, density=0.3, heads=2)
    assert layout.to("cpu") is layout
    assert layout.to(torch.device("cpu")) is layout
    assert layout.expand(layout.batch, layout.heads) is layout


def test_derived_kernel_inputs_are_computed_once_per_layout():
    layout = blockattn.patterns.random_blocks(256, density=0.3, heads=2)
    assert layout.transpose()[1] is layout.transpose()[1]
    moved = layout.expand(3, 2)
    assert moved.kv_counts.shape == (3, 2, 4) and torch.equal(moved.to_dense()[1], layout.to_dense()[0])


# ------------------------------------------------------------------ is_causal, from_tile_masks, cat
def naive_is_causal(layout):
    """[Lq, Lk] loop: no allowed pair (i, j) with j after i's aligned position."""
    mask = layout.to_token_mask()
    offset = layout.k_len - layout.q_len
    j = torch.arange(layout.k_len).view(1, -1)
    i = torch.arange(layout.q_len).view(-1, 1) + offset
    return not bool((mask & (j > i)).any())


@pytest.mark.parametrize("q_len,k_len", [(100, 100), (40, 130), (130, 90)])
def test_is_causal_equals_the_token_rule(q_len, k_len):
    g = torch.Generator().manual_seed(q_len + k_len)
    for trial in range(12):
        token = torch.rand(2, 3, q_len, k_len, generator=g) < 0.3
        i = torch.arange(q_len).view(-1, 1) + k_len - q_len
        j = torch.arange(k_len).view(1, -1)
        if trial % 2:
            token &= j <= i  # causal by construction, except ...
            if trial % 4 == 1:  # ... one future pair somewhere
                r = int(torch.randint(0, q_len, (1,), generator=g))
                if int(i[r]) + 1 < k_len:
                    token[1, 2, r, int(i[r]) + 1] = True
        layout = BlockLayout.from_token_mask(token, block_q=16, block_k=32, allow_empty_rows=True)
        assert layout.is_causal() == naive_is_causal(layout)
    band = blockattn.patterns.sliding_window(q_len, k_len, window=(5, 0), causal=False, block_q=16, block_k=16) \
        if q_len <= k_len else None
    if band is not None:
        assert band.is_causal() and not blockattn.patterns.full(q_len, k_len).is_causal()
        assert not blockattn.patterns.sliding_window(q_len, k_len, window=(5, 1), causal=False).is_causal()


def test_from_tile_masks_equals_naive_and_drops_empty_and_full_masks():
    g = torch.Generator().manual_seed(7)
    q_len, k_len, bq, bk = 70, 90, 16, 32
    n_q, n_k = 5, 3
    token = torch.zeros(2, 3, q_len, k_len, dtype=torch.bool)
    tiles, masks = [], []
    for b in range(2):
        for h in range(3):
            for qb in range(n_q):
                for kb in range(n_k):
                    kind = int(torch.randint(0, 4, (1,), generator=g))  # 0 absent, 1 random, 2 all, 3 none
                    if kind == 0:
                        continue
                    m = torch.rand(bq, bk, generator=g) < 0.5 if kind == 1 else torch.full((bq, bk), kind == 2)
                    tiles.append((b, h, qb, kb))
                    masks.append(m)
                    rows, cols = slice(qb * bq, min(q_len, (qb + 1) * bq)), slice(kb * bk, min(k_len, (kb + 1) * bk))
                    token[b, h, rows, cols] = m[:rows.stop - rows.start, :cols.stop - cols.start]
    b, h, qb, kb = (torch.tensor(x) for x in zip(*tiles))
    layout = BlockLayout.from_tile_masks((b, h, qb, kb), torch.stack(masks), q_len=q_len, k_len=k_len,
                                         block_q=bq, block_k=bk, allow_empty_rows=True)
    assert torch.equal(layout.to_token_mask(), token)
    expected_blocks = torch.zeros(2, 3, n_q, n_k, dtype=torch.bool)
    for b_, h_, q_, k_ in tiles:
        expected_blocks[b_, h_, q_, k_] = bool(token[b_, h_, q_ * bq:(q_ + 1) * bq, k_ * bk:(k_ + 1) * bk].any())
    assert torch.equal(layout.to_dense(), expected_blocks)  # empty masks dropped
    # full in-range masks carry no mask; identical masks are stored once
    stored = layout.tile_masks.flatten(1)
    assert len(torch.unique(stored, dim=0)) == len(stored)
    assert not stored.all(1).any() and stored.any(1).all()
    shared = BlockLayout.from_tile_masks((b, h, qb, kb), torch.stack(masks[:1]), mask_ids=torch.zeros_like(b),
                                         q_len=q_len, k_len=k_len, block_q=bq, block_k=bk, causal=True,
                                         allow_empty_rows=True)
    i = torch.arange(q_len).view(-1, 1) + k_len - q_len
    listed = torch.zeros(2, 3, q_len, k_len, dtype=torch.bool)
    for b_, h_, q_, k_ in tiles:
        listed[b_, h_, q_ * bq:(q_ + 1) * bq, k_ * bk:(k_ + 1) * bk] = masks[0][:min(bq, q_len - q_ * bq),
                                                                                 :min(bk, k_len - k_ * bk)]
    assert torch.equal(shared.to_token_mask(), listed & (torch.arange(k_len).view(1, -1) <= i))
    with pytest.raises(ValueError, match="masks"):
        BlockLayout.from_tile_masks((b, h, qb, kb), torch.stack(masks)[:3], q_len=q_len, k_len=k_len,
                                    block_q=bq, block_k=bk)
    with pytest.raises(TypeError, match="tiles"):
        BlockLayout.from_tile_masks([b, h], None, q_len=q_len, k_len=k_len)


def test_cat_equals_stacked_token_masks():
    causal = blockattn.patterns.causal(100, block_q=16, block_k=16)
    window = blockattn.patterns.sliding_window(100, window=20, block_q=16, block_k=16)
    token = torch.rand(1, 2, 100, 100) < 0.2
    token[..., torch.arange(100), torch.arange(100)] = True
    masked = BlockLayout.from_token_mask(token, block_q=16, block_k=16)
    for layouts in ([causal, causal.expand(1, 2)], [causal, window, masked], [masked, masked]):
        for dim in (0, 1):
            joined = BlockLayout.cat(layouts, dim)
            size = max(l.kv_counts.shape[1 - dim] for l in layouts)
            expected = torch.cat([l.to_token_mask().expand(*((-1, size) if dim == 0 else (size, -1)), -1, -1)
                                  for l in layouts], dim)
            assert torch.equal(joined.to_token_mask(), expected)
    assert BlockLayout.cat([causal, causal], 1).causal  # one rule: kept analytic
    with pytest.raises(ValueError, match="q_len"):
        BlockLayout.cat([causal, blockattn.patterns.causal(90, block_q=16, block_k=16)], 1)
    with pytest.raises(ValueError, match="dim"):
        BlockLayout.cat([causal], 2)
    with pytest.raises(TypeError, match="BlockLayout"):
        BlockLayout.cat([causal, "x"], 0)
