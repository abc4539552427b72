"""TidalDecode: dense layers, two token-selection layers, position-persistent sparse layers; checked
against a float64 twin of the official rule (masked logits, per query head, fresh every step)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import hf, kv  # noqa: E402
from tests.kv.common import VOCAB, decode, rel, tiny_llama  # noqa: E402


class TidalTwin:
    NAME = "blockattn_kv_test_tidal"

    def __init__(self, model, top_k, start, correction):
        transformers.AttentionInterface.register(self.NAME, self.forward)
        self.model = transformers.LlamaForCausalLM(model.config).eval().double()
        self.model.load_state_dict(model.state_dict())
        self.model.set_attn_implementation(self.NAME)
        self.top_k, self.start, self.correction = top_k, start, correction

    def logits(self, ids, fed):
        self.prompt = ids.shape[1]
        with torch.no_grad():
            return self.model(torch.cat([ids, torch.tensor([fed])], 1)).logits[0, self.prompt:]

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer, length = module.layer_idx, query.shape[2]
        group = query.shape[1] // key.shape[1]
        out = torch.zeros_like(query)
        for h in range(query.shape[1]):
            logits = query[0, h] @ key[0, h // group].T * scaling
            logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
            for row in range(self.prompt, length):
                if layer in (self.start, self.correction):
                    self.selected[h, row] = logits[row].topk(self.top_k).indices
                elif layer > self.start:
                    keep = torch.zeros(length, dtype=torch.bool)
                    keep[self.selected[h, row]] = True
                    logits[row] = logits[row].masked_fill(~keep, float("-inf"))
            out[0, h] = logits.softmax(-1) @ value[0, h // group]
        return out.transpose(1, 2).contiguous(), None

    selected: dict = {}


def test_decode_matches_the_official_rule():
    model = tiny_llama(layers=5, heads=4, kv_heads=2)
    ids = torch.randint(0, VOCAB, (1, 100))
    policy = kv.get("tidaldecode", top_k=12, sparse_layer_start=1, correction_layer=3)
    logits, fed, _, cache = decode(model, ids, 5, policy)
    twin = TidalTwin(model, 12, 1, 3)
    twin.selected = {}
    expected = twin.logits(ids, fed)
    assert rel(logits, expected) < 1e-5
    assert cache.lengths() == [[105, 105]] * 5   # selection without eviction
    dense, *_ = decode(model, ids, 5, "knorm", greedy_from=fed)
    assert rel(dense, expected) > 1e-4
    everything, *_ = decode(model, ids, 5, kv.get("tidaldecode", top_k=1000, sparse_layer_start=1),
                            greedy_from=fed)
    assert rel(everything, dense) < 1e-5   # k >= n is dense


def test_layer_roles_are_checked():
    with pytest.raises(ValueError, match="sparse_layer_start < correction_layer < layers"):
        hf.patch(tiny_llama(layers=3), kv=kv.get("tidaldecode", sparse_layer_start=1, correction_layer=3))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        kv.get("tidaldecode", top_k=0)


def test_a_multi_token_chunk_selects_per_row():
    model = tiny_llama(layers=5, heads=6, kv_heads=2, hidden=48)   # GQA groups of 3
    ids, chunk = torch.randint(0, VOCAB, (1, 100)), torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad(), hf.patch(model, kv=kv.get("tidaldecode", top_k=12, sparse_layer_start=1,
                                                    correction_layer=3)):
        cache = model(ids, use_cache=True).past_key_values
        got = model(chunk, past_key_values=cache, use_cache=True).logits[0]
    twin = TidalTwin(model, 12, 1, 3)
    twin.selected = {}
    assert rel(got, twin.logits(ids, chunk[0].tolist())) < 1e-5
