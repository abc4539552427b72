"""A tiny random Llama and a whitespace tokenizer for the analysis tests (no model files needed)."""
import pytest
import torch


class WordTokenizer:
    """Whitespace words -> ids (punctuation kept on words). `hashed` spreads words over the vocabulary by a
    polynomial hash instead of the character sum, so that short words (colors) do not collide."""

    def __init__(self, vocab=97, *, hashed=False):
        self.vocab, self.hashed = vocab, hashed

    def word_id(self, word):
        if self.hashed:
            return sum(ord(ch) * 31 ** i for i, ch in enumerate(word)) % self.vocab
        return sum(map(ord, word)) % self.vocab

    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            pass
        encoded = Encoded()
        encoded.input_ids = [self.word_id(w) for w in text.split()]
        return encoded


def tiny_llama(*, vocab=97, layers=2, heads=4, positions=256, weight_scale=1.0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=2,
                                      max_position_embeddings=positions)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    if weight_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(weight_scale)
    return model


def o_proj_io(model, ids):
    """`{layer: (o_proj input, o_proj output)}` of one forward: the per-head results (before o_proj) the
    analysis code reads, recorded plainly."""
    seen = {}
    hooks = [blk.self_attn.o_proj.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0].clone(), o)))
             for i, blk in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen
