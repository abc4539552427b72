"""LongHeads chunk selection against a float64 loop implementation of its rule, and its properties."""
import math

import pytest
import torch

import blockattn
from blockattn.methods.longheads import LongHeads


def naive_chunk_keys(q, k, v, w):
    q, k = q.double(), k.double()
    v = k if v is None else v.double()
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads, -(-length // w), dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for c in range(out.shape[2]):
                tokens = range(c * w, min(length, (c + 1) * w))
                keys = torch.stack([k[b, h // group, j] for j in tokens])
                values = torch.stack([v[b, h // group, j] for j in tokens])
                outputs = [torch.softmax(keys @ q[b, h, i] / math.sqrt(dim), 0) @ values for i in tokens]
                summary = sum(outputs) / len(outputs)
                out[b, h, c] = torch.softmax(keys @ summary / math.sqrt(dim), 0) @ keys
    return out


def naive_longheads_mask(q, k, v, *, w, atten_length, begin):
    batch, heads, length, _ = q.shape
    chunk_keys = naive_chunk_keys(q, k, v, w)
    budget = atten_length // w
    mask = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                current = i // w
                if i < begin:
                    chosen = set(range(current + 1))
                else:
                    forced = {0, max(current - 1, 0), current}
                    rest = sorted(set(range(current + 1)) - forced,
                                  key=lambda c: -float(q[b, h, i].double() @ chunk_keys[b, h, c]))
                    chosen = forced | set(rest[:max(0, budget - len(forced))])
                for j in range(i + 1):
                    mask[b, h, i, j] = j // w in chosen
    return mask


@pytest.mark.parametrize("length,w,atten,begin,with_v,tile", [
    (256, 16, 64, 64, False, 32), (200, 16, 48, 32, True, 16), (160, 32, 96, 0, False, 32), (96, 8, 24, 200, False, 16)])
def test_token_mask_equals_naive_rule(length, w, atten, begin, with_v, tile):
    g = torch.Generator().manual_seed(length + w)
    q, k, v = (torch.randn(1, h, length, 8, generator=g) for h in (4, 2, 2))
    method = LongHeads(window_size=w, atten_length=atten, begin_selective_length=begin, tile_size=tile)
    layout = method.select(q, k, v=v if with_v else None)
    expected = naive_longheads_mask(q, k, v if with_v else None, w=w, atten_length=atten, begin=begin)
    assert torch.equal(layout.to_token_mask(), expected)


def test_chunk_budget_exact_and_forced_chunks_kept():
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(2, 4, 512, 16, generator=g), torch.randn(2, 2, 512, 16, generator=g)
    method = LongHeads(window_size=32, atten_length=128, begin_selective_length=128)
    gates = method.gates(q, k)
    position = torch.arange(512)
    current = position // 32
    selective = position >= 128
    assert (gates.sum(-1)[..., selective] == 4).all()            # exactly atten_length / window_size chunks
    assert gates[..., 0].all()                                    # first chunk
    assert gates.gather(-1, current.view(1, 1, -1, 1).expand(2, 4, -1, 1)).all()  # current chunk
    assert gates[..., selective, :].gather(-1, (current[selective] - 1).view(1, 1, -1, 1).expand(2, 4, -1, 1)).all()
    assert not (gates & (torch.arange(16).view(1, -1) > current.view(-1, 1))).any()  # no future chunk
    mask = method.select(q, k).to_token_mask()
    assert not mask.triu(1).any()


def test_defaults_on_smollm2_shapes():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, h, 512, 64, generator=g) for h in (9, 3, 3))
    method = LongHeads(window_size=64, atten_length=256, begin_selective_length=256)
    out = blockattn.sparse_attention(q, k, v, method, backend="torch")
    mask = method.select(q, k).to_token_mask()
    keys, values = k.repeat_interleave(3, 1).double(), v.repeat_interleave(3, 1).double()
    scores = (q.double() @ keys.transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    assert torch.allclose(out.double(), torch.softmax(scores, -1) @ values, atol=1e-5)
    # within the paper's defaults (4096 tokens) LongHeads is plain causal attention
    dense = LongHeads().select(q, k).to_token_mask()
    assert torch.equal(dense[0, 0], torch.ones(512, 512, dtype=torch.bool).tril())


@pytest.mark.parametrize("params", [dict(window_size=0), dict(atten_length=100), dict(atten_length=512),
                                    dict(begin_selective_length=-1), dict(tile_size=0)])
def test_bad_parameters(params):
    with pytest.raises(ValueError):
        LongHeads(**params)


def test_bad_inputs():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="q_len"):
        LongHeads().select(q, torch.randn(1, 2, 32, 8))
    with pytest.raises(ValueError, match="v must"):
        LongHeads().select(q, q, v=torch.randn(1, 2, 32, 8))
