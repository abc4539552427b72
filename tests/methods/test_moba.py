"""MoBA against a float64 per-token loop implementation of its gating rule, and its claimed properties."""
import pytest
import torch

import blockattn
from blockattn.methods.moba import MoBA


def naive_moba_mask(q, k, *, block_size, top_k, sink=False):
    """Loop over query tokens: score past blocks by <q, mean(K_block)>, keep top_k with the current block."""
    q, k = q.double(), k.double()
    batch, heads, q_len, _ = q.shape
    group = heads // k.shape[1]
    k_len = k.shape[2]
    n_blocks = -(-k_len // block_size)
    mask = torch.zeros(batch, heads, q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            keys = k[b, h // group]
            means = [keys[i * block_size:(i + 1) * block_size].mean(0) for i in range(n_blocks)]
            for t in range(q_len):
                pos = t + k_len - q_len
                current = pos // block_size
                past = sorted(range(current), key=lambda i: (-float(q[b, h, t] @ means[i]), i))
                chosen = [current] + past[:top_k - 1] + ([0] if sink else [])
                for i in chosen:  # the whole block, up to the query itself (causal inside its own block)
                    mask[b, h, t, i * block_size:min((i + 1) * block_size, k_len, pos + 1)] = True
    return mask


def masked_attention_float64(q, k, v, mask):
    """Softmax attention over an explicit token mask, in float64, key heads repeated for their query groups."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, 1) for t in (k, v))
    logits = (q.double() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("q_len,k_len,block_size,top_k,tile", [
    (200, 200, 32, 3, 16), (130, 130, 64, 2, 32), (50, 170, 32, 3, 16), (96, 96, 16, 1, 16)])
def test_token_mask_equals_naive_rule(q_len, k_len, block_size, top_k, tile):
    g = torch.Generator().manual_seed(q_len * top_k)
    q, k = torch.randn(1, 4, q_len, 8, generator=g), torch.randn(1, 2, k_len, 8, generator=g)
    layout = MoBA(block_size=block_size, top_k=top_k, tile_size=tile).select(q, k)
    assert torch.equal(layout.to_token_mask(), naive_moba_mask(q, k, block_size=block_size, top_k=top_k))


@pytest.mark.parametrize("q_len,k_len", [(1600, 1600), (300, 1600)])
def test_defaults_equal_naive_rule_and_float64_attention(q_len, k_len):
    """The paper's defaults (block 512, top-3, 64-token tiles): each MoBA block spans 8 tiles, so a
    query tile's row masks are shared across several tiles and blocks; the last block is partial."""
    g = torch.Generator().manual_seed(q_len + k_len)
    q = torch.randn(1, 4, q_len, 16, generator=g)
    k, v = torch.randn(1, 2, k_len, 16, generator=g), torch.randn(1, 2, k_len, 16, generator=g)
    method = MoBA()
    assert (method.block_size, method.top_k, method.tile_size) == (512, 3, 64)
    mask = naive_moba_mask(q, k, block_size=512, top_k=3)
    assert torch.equal(method.select(q, k).to_token_mask(), mask)
    out = blockattn.sparse_attention(q, k, v, "moba")
    assert torch.allclose(out.double(), masked_attention_float64(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("q_len,k_len,block_size,top_k,tile", [(200, 200, 32, 2, 16), (1600, 1600, 512, 3, 64),
                                                                (90, 300, 64, 1, 32)])
def test_sink_option_adds_the_first_block(q_len, k_len, block_size, top_k, tile):
    g = torch.Generator().manual_seed(k_len + top_k)
    q, k = torch.randn(1, 2, q_len, 8, generator=g), torch.randn(1, 1, k_len, 8, generator=g)
    v = torch.randn(1, 1, k_len, 8, generator=g)
    params = dict(block_size=block_size, top_k=top_k, tile_size=tile)
    mask = naive_moba_mask(q, k, **params_of(params), sink=True)
    assert torch.equal(MoBA(**params, sink=True).select(q, k).to_token_mask(), mask)
    assert not torch.equal(mask, naive_moba_mask(q, k, **params_of(params)))  # the option changes something here
    out = blockattn.sparse_attention(q, k, v, "moba", **params, sink=True)
    assert torch.allclose(out.double(), masked_attention_float64(q, k, v, mask), atol=1e-5)
    assert MoBA().sink is False


def params_of(params):
    return dict(block_size=params["block_size"], top_k=params["top_k"])


def test_properties_top_k_count_current_block_causal():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 512, 16, generator=g), torch.randn(2, 3, 512, 16, generator=g)
    method = MoBA(block_size=64, top_k=3, tile_size=32)
    gates = method.gates(q, k)
    current = torch.arange(512) // 64
    expected = torch.clamp(current + 1, max=3)                       # exactly top_k once enough blocks exist
    assert torch.equal(gates.sum(-1), expected.expand(2, 3, 512))
    assert gates[..., torch.arange(512), current].all()              # current block always chosen
    assert not (gates & (torch.arange(8).view(1, -1) > current.view(-1, 1))).any()  # no future block
    layout = method.select(q, k)
    assert layout.density("causal") <= 1.0
    # per-token gating: most tiles are touched by some token, but far fewer token pairs are computed
    assert MoBA(block_size=64, top_k=2, tile_size=32).select(q, k).token_density() < 0.25


def test_attention_through_moba_layout_is_exact():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    layout = MoBA(block_size=64, top_k=2, tile_size=32).select(q, k)
    from blockattn.ops.reference import reference_attention
    out = blockattn.sparse_attention(q, k, v, "moba", block_size=64, top_k=2, tile_size=32)
    assert torch.allclose(out.double(), reference_attention(q.double(), k.double(), v.double(), layout), atol=1e-5)


@pytest.mark.parametrize("params,message", [(dict(top_k=0), "top_k"), (dict(block_size=100), "multiple of tile_size"),
                                            (dict(tile_size=-1), "tile_size")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        blockattn.methods.get("moba", **params)


def test_sink_must_be_bool():
    with pytest.raises(TypeError, match="sink"):
        blockattn.methods.get("moba", sink=1)
