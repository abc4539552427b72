"""MInference vertical-slash against a float64 loop implementation of its estimate and a line-by-line
transcription of its CUDA index conversion (csrc/vertical_slash_index.cu)."""
import pytest
import torch

import blockattn
from blockattn.methods.vertical_slash import VerticalSlash, slash_ranges


def official_conversion(v_idx, s_idx, end_m, block):
    """`convert_vertical_slash_indexes_kernel` for one query block: v_idx ascending key columns,
    s_idx descending diagonal offsets; returns the set of keys its block offsets and columns cover."""
    keys, v, s = set(), 0, 0
    nnz_v, nnz_s = len(v_idx), len(s_idx)
    v_val = v_idx[v]; v += 1
    s_val = s_idx[s]; s += 1
    while s_val >= end_m:
        s_val = s_idx[s]; s += 1
    s_val = max(end_m - s_val, block)
    range_start, range_end = s_val - block, s_val
    while True:
        if v_val < range_end:
            if v_val < range_start:
                keys.add(v_val)
            if v < nnz_v:
                v_val = v_idx[v]; v += 1
            else:
                v_val = end_m + block
        else:
            if s < nnz_s:
                s_val = max(end_m - s_idx[s], block); s += 1
            else:
                keys.update(range(range_start, range_end))
                break
            if s_val > range_end + block:
                keys.update(range(range_start, range_end))
                range_start, range_end = s_val - block, s_val
            elif s_val > range_end:
                range_end += block
    return keys


def naive_vertical_slash(q, k, *, vertical_size, slash_size, last_q, block):
    q, k = q.double(), k.double()
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    last = min(last_q, length)
    mask = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            vertical = [0.0] * length
            slash = [0.0] * length
            for i in range(length - last, length):
                row = [float(q[b, h, i] @ k[b, h // group, j]) / dim ** 0.5 for j in range(i + 1)]
                top = max(row)
                weights = [pow(2.718281828459045, x - top) for x in row]
                total = sum(weights)
                for j in range(i + 1):
                    vertical[j] += weights[j] / total
                    slash[i - j] += weights[j] / total
            for j in range(min(30, length)):
                vertical[j] = float("inf")
            for o in range(min(100, length)):
                slash[o] = last + 1 + min(100, length) - o
            v_keep = sorted(range(length), key=lambda j: -vertical[j])[:min(length, max(vertical_size, 30))]
            s_keep = sorted(range(length), key=lambda o: -slash[o])[:min(length, max(slash_size, 50))]
            v_sorted, s_sorted = sorted(v_keep), sorted(s_keep, reverse=True)
            for qb in range(-(-length // block)):
                keys = official_conversion(v_sorted, s_sorted, (qb + 1) * block, block)
                for i in range(qb * block, min(length, (qb + 1) * block)):
                    for j in keys:
                        if j <= i:
                            mask[b, h, i, j] = True
    return mask


def random_diagonals(length, count, *, seed, style):
    """A kept-offset set as the estimate makes it (the 100 nearest forced) plus `count` more: dense,
    clustered (runs of nearby diagonals) or isolated far ones."""
    g = torch.Generator().manual_seed(seed)
    kept = torch.zeros(length, dtype=torch.bool)
    kept[:min(100, length)] = True
    if style == "spaced":  # gaps between one and two blocks: the kernel's merge depends on their phase
        extra = 100 + torch.randint(60, 140, (length // 60,), generator=g).cumsum(0)
        extra = extra[extra < length]
    elif style == "isolated":
        extra = torch.randperm(length - 100, generator=g)[:count] + 100
    elif style == "clustered":
        centres = torch.randint(100, length, (max(1, count // 8),), generator=g)
        extra = (centres.view(-1, 1) + torch.randint(-90, 90, (1, 8), generator=g)).clamp(100, length - 1).view(-1)
    else:
        extra = torch.randint(100, length, (count,), generator=g)
    kept[extra] = True
    return kept


@pytest.mark.parametrize("length,count,block,style", [
    (2048, 58, 64, "isolated"), (2048, 120, 64, "clustered"), (1500, 300, 64, "dense"), (4096, 150, 64, "clustered"),
    (1000, 60, 32, "isolated"), (777, 80, 48, "clustered"), (3000, 0, 64, "spaced"), (1000, 0, 32, "spaced")])
def test_slash_ranges_equal_the_official_conversion(length, count, block, style):
    diagonals = torch.stack([random_diagonals(length, count, seed=length + i, style=style) for i in range(3)])
    diagonals = diagonals[:3].view(1, 3, length)
    n = int(diagonals.sum(-1).min())
    diagonals = torch.stack([d & (torch.cumsum(d.int(), 0) <= n) for d in diagonals[0]]).unsqueeze(0)  # same count
    got = slash_ranges(diagonals, block)
    for h in range(3):
        offsets = sorted(diagonals[0, h].nonzero().view(-1).tolist(), reverse=True)
        for qb in range(-(-length // block)):
            end = (qb + 1) * block
            keys = official_conversion([end + block], offsets, end, block)  # no vertical lines
            expected = torch.zeros(length, dtype=torch.bool)
            expected[[j for j in keys if j < length]] = True
            assert torch.equal(got[0, h, qb], expected), (h, qb)


def test_official_conversion_keeps_more_than_exact_crossings():
    # the audit's gap: on sparse far diagonals the kernel keeps whole 64-key steps, a superset of the
    # keys the diagonals cross
    length, block = 2048, 64
    diagonals = random_diagonals(length, 58, seed=1, style="isolated").view(1, 1, length)
    ranges = slash_ranges(diagonals, block)
    offsets = diagonals[0, 0].nonzero().view(-1)
    starts = torch.arange(-(-length // block)).view(-1, 1) * block
    j = torch.arange(length).view(1, -1)
    crossed = ((starts.unsqueeze(-1) - j.unsqueeze(-1) <= offsets) &
               (offsets <= starts.unsqueeze(-1) + block - 1 - j.unsqueeze(-1))).any(-1)
    rows = (torch.arange(-(-length // block)).view(-1, 1) + 1) * block - 1
    causal = j <= rows
    assert not (crossed & causal & ~ranges[0, 0]).any()              # every crossed key is kept
    assert (ranges[0, 0] & causal & ~crossed).sum() > 0.02 * (crossed & causal).sum()


@pytest.mark.parametrize("length,v,s,last,block", [(300, 40, 60, 16, 32), (257, 35, 120, 64, 64), (180, 1, 1, 8, 16)])
def test_token_mask_equals_naive_rule(length, v, s, last, block):
    g = torch.Generator().manual_seed(length)
    q, k = torch.randn(1, 2, length, 8, generator=g) * 2, torch.randn(1, 1, length, 8, generator=g) * 2
    method = VerticalSlash(vertical_size=v, slash_size=s, last_q=last, block_size=block)
    expected = naive_vertical_slash(q, k, vertical_size=v, slash_size=s, last_q=last, block=block)
    assert torch.equal(method.select(q, k).to_token_mask(), expected)


def test_properties_counts_forced_lines_causal():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 1024, 16, generator=g), torch.randn(2, 3, 1024, 16, generator=g)
    method = VerticalSlash(vertical_size=100, slash_size=200)
    columns, diagonals = method.lines(q, k)
    assert (columns.sum(-1) == 100).all() and (diagonals.sum(-1) == 200).all()  # exact top-k counts
    assert columns[..., :30].all() and diagonals[..., :100].all()               # forced sinks and local lines
    mask = method.select(q, k).to_token_mask()
    assert not (mask & torch.ones(1024, 1024, dtype=torch.bool).triu(1)).any()  # no future key
    assert mask.diagonal(dim1=-2, dim2=-1).all() and mask[..., :30].tril().eq(
        torch.ones(1024, 30, dtype=torch.bool).tril()).all()


def test_attention_through_layout_is_exact():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 400, 16, generator=g) for _ in range(3))
    method = VerticalSlash(vertical_size=40, slash_size=60)
    from blockattn.ops.reference import reference_attention
    out = blockattn.sparse_attention(q, k, v, "vertical_slash", vertical_size=40, slash_size=60)
    ref = reference_attention(q.double(), k.double(), v.double(), method.select(q, k))
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("params,message", [(dict(vertical_size=0), "vertical_size"), (dict(slash_size=-3), "slash_size"),
                                            (dict(block_size=2.5), "block_size"), (dict(last_q=True), "last_q")])
def test_bad_parameters(params, message):
    with pytest.raises((TypeError, ValueError), match=message):
        blockattn.methods.get("vertical_slash", **params)


def test_unequal_lengths_rejected():
    with pytest.raises(ValueError, match="q_len"):
        VerticalSlash().select(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 20, 8))


@pytest.mark.parametrize("length,block,style", [(2048, 64, "clustered"), (1000, 32, "spaced"), (777, 48, "isolated")])
def test_packed_ranges_equal_the_unpacked(length, block, style):
    from blockattn.methods._select import unpack_bits
    diagonals = torch.stack([random_diagonals(length, 60, seed=i, style=style) for i in range(2)])
    n = int(diagonals.sum(-1).min())
    diagonals = torch.stack([d & (torch.cumsum(d.int(), 0) <= n) for d in diagonals]).unsqueeze(0)
    dense = slash_ranges(diagonals, block)
    words = slash_ranges(diagonals, block, packed=True)
    n_k = -(-length // block)
    bits = unpack_bits(words.unsqueeze(-1), block).flatten(-2)[..., :length]
    assert torch.equal(bits, dense)
