"""TidalDecode (Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse
Attention", ICLR 2025; official code DerrickYLJ/TidalDecode, `src/tidal_build/modify_llama.py`).

Rule, per decode step (the prefill is dense and nothing is evicted): layers below `sparse_layer_start`
attend densely; the token-selection layers `sparse_layer_start` and `correction_layer` attend densely
too and pick, per query head, the `top_k` positions with the largest (causally masked) logits; every
other layer attends, per query head, only to the positions the last selection layer picked for the same
head index (position persistence). Selection is fresh at every step. The sparse layers gather the picked
keys and run the engine over them (one gathered group per query head and row).
"""
from __future__ import annotations

import dataclasses

import torch

import blockattn
from blockattn.kv import register
from blockattn.kv.base import Policy, Selection, check_int

_SELECTION = "tidaldecode"


@register("tidaldecode")
@dataclasses.dataclass
class TidalDecode(Policy):
    compresses = False

    top_k: int = 256
    sparse_layer_start: int = 2
    correction_layer: int | None = None   # None: 13/32 of the depth (layer 13 of Llama-3-8B's 32)

    def __post_init__(self):
        check_int("top_k", self.top_k, 1)
        check_int("sparse_layer_start", self.sparse_layer_start, 0)
        if self.correction_layer is not None:
            check_int("correction_layer", self.correction_layer, 1)

    def setup(self, model, runtime):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = config.num_hidden_layers
        if self.correction_layer is None:
            self.correction_layer = max(self.sparse_layer_start + 1, round(13 * layers / 32))
        if not self.sparse_layer_start < self.correction_layer < layers:
            raise ValueError(f"tidaldecode needs sparse_layer_start < correction_layer < layers; got "
                             f"{self.sparse_layer_start}, {self.correction_layer}, {layers}")

    def select(self, layer, query, key, value, scale):
        batch, heads, n, _ = key.shape
        return Selection([torch.arange(n, device=key.device).expand(batch, n)] * heads)

    def attend(self, cache, state, layer, query, scale, backend):
        if layer < self.sparse_layer_start:
            return super().attend(cache, state, layer, query, scale, backend)
        if layer in (self.sparse_layer_start, self.correction_layer):
            cache.scratch[_SELECTION] = self._top_k(state, query)
            return super().attend(cache, state, layer, query, scale, backend)
        return self._sparse(state, query, cache.scratch[_SELECTION], scale, backend)

    def _top_k(self, state, query):
        """Per query head and row, the top-k causally visible positions: `[B, Hq, Lq, k]`."""
        heads = len(state.head_keys)
        group = query.shape[1] // heads
        q_len, n = query.shape[2], state.head_keys[0].shape[1]
        k = min(self.top_k, n - q_len + 1)   # the first row sees n − Lq + 1 keys
        last_visible = n - q_len + torch.arange(q_len, device=query.device)
        future = torch.arange(n, device=query.device) > last_visible[:, None]
        picks = []
        for h in range(heads):
            # softmax is monotone and the scale positive: top-k of the raw logits is top-k of the attention
            logits = torch.einsum("bgqd,bnd->bgqn", query[:, h * group:(h + 1) * group].float(),
                                  state.head_keys[h].float())
            picks.append(logits.masked_fill(future, float("-inf")).topk(k, dim=-1).indices)
        return torch.cat(picks, dim=1)

    def _sparse(self, state, query, picks, scale, backend):
        batch, hq, q_len, dim = query.shape
        heads = len(state.head_keys)
        group = hq // heads
        k = picks.shape[-1]
        keys, values = [], []
        for h in range(hq):
            index = picks[:, h].reshape(batch, q_len * k, 1).expand(-1, -1, dim)
            keys.append(state.head_keys[h // group].gather(1, index).view(batch, q_len, k, dim))
            values.append(state.head_values[h // group].gather(1, index).view(batch, q_len, k, dim))
        keys = torch.stack(keys, 1).reshape(batch, hq * q_len, k, dim)
        values = torch.stack(values, 1).reshape(batch, hq * q_len, k, dim)
        out = blockattn.attention(query.reshape(batch, hq * q_len, 1, dim), keys, values,
                                  blockattn.patterns.full(1, k), scale=scale, backend=backend)
        return out.view(batch, hq, q_len, dim)
