"""`KVCache`: a transformers `Cache` holding, per layer and per KV head, only the tokens a policy keeps.

Storage is one tensor `[B, n_h, D]` per KV head for keys and one for values, so heads of one layer may
hold different numbers of tokens and the bytes held really drop (no padding to the longest head, no fake
keys); an int32 `[B, n_h]` per head records each kept token's position (4 bytes a token, counted).
Keys are stored after RoPE, so a kept token keeps its original position; `get_seq_length()` is the
number of tokens the layer has *seen*, which transformers turns into the position ids of the next tokens
(the shrunken length would restart RoPE at the wrong place). A head may also hold one
compensation slot (RazorAttention): the mean key/value of the tokens it dropped and their count N_d,
attended as if it were N_d identical tokens.

The cache only works with a model patched by `blockattn.hf.patch(model, kv=...)`: `update` returns just
the new tokens, and the patched attention function attends over the per-head buffers itself.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


class KVLayer(CacheLayerMixin):
    """One layer of a `KVCache`: per-KV-head key/value buffers, their compensation slots and capacities."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0                              # tokens given to this layer (true positions)
        self.head_keys: list[Tensor] = []          # per KV head [B, n_h, D], position order
        self.head_values: list[Tensor] = []
        self.positions: list[Tensor] = []          # per KV head [B, n_h] int32: each kept token's position
        self.comp_keys: list[Tensor | None] = []   # per KV head [B, D] mean of dropped keys, or None
        self.comp_values: list[Tensor | None] = []
        self.comp_counts: list[Tensor | None] = []  # per KV head [B] float: tokens the slot stands for
        self.capacity: list[int | None] = []       # per KV head: bound kept while decoding (None: grows)
        self.pending: tuple[Tensor, Tensor] | None = None  # prefill K/V awaiting the policy
        self.awaiting_attention = False

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.awaiting_attention:
            raise RuntimeError("blockattn.kv.KVCache was updated twice without its attention step: it only "
                               "works with a model patched by blockattn.hf.patch(model, kv=...)")
        self.awaiting_attention = True
        start, self.seen = self.seen, self.seen + key_states.shape[2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.pending = (key_states, value_states)
            return key_states, value_states
        for h in range(len(self.head_keys)):
            self.head_keys[h] = torch.cat([self.head_keys[h], key_states[:, h]], dim=1)
            self.head_values[h] = torch.cat([self.head_values[h], value_states[:, h]], dim=1)
        new = torch.arange(start, self.seen, device=key_states.device, dtype=torch.int32)
        self.positions = [torch.cat([p, new.expand(p.shape[0], -1)], dim=1) for p in self.positions]
        return key_states, value_states

    def store(self, positions: list[Tensor], keys: list[Tensor], values: list[Tensor],
              comp: list[tuple[Tensor, Tensor, Tensor] | None], capacity: list[int | None]) -> None:
        """Replace the pending prefill K/V with what the policy keeps (one entry per KV head)."""
        self.pending = None
        self.positions = [p.to(torch.int32) for p in positions]
        self.head_keys = [k.contiguous() for k in keys]
        self.head_values = [v.contiguous() for v in values]
        self.comp_keys = [c[0] if c is not None else None for c in comp]
        self.comp_values = [c[1] if c is not None else None for c in comp]
        self.comp_counts = [c[2] if c is not None else None for c in comp]
        self.capacity = list(capacity)

    def keep(self, head: int, index: Tensor) -> None:
        """Keep only the tokens `index [B, n]` (sorted positions in the buffer) of one head."""
        gather = index.unsqueeze(-1).expand(-1, -1, self.head_keys[head].shape[-1])
        self.head_keys[head] = self.head_keys[head].gather(1, gather)
        self.head_values[head] = self.head_values[head].gather(1, gather)
        self.positions[head] = self.positions[head].gather(1, index)

    def lengths(self) -> list[int]:
        return [k.shape[1] for k in self.head_keys]

    def nbytes(self) -> int:
        tensors = [*self.head_keys, *self.head_values, *self.positions, *self.comp_keys, *self.comp_values,
                   *self.comp_counts]
        if self.pending is not None:
            tensors += list(self.pending)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def offload(self):
        raise NotImplementedError("blockattn.kv.KVCache does not offload")

    def prefetch(self):
        raise NotImplementedError("blockattn.kv.KVCache does not offload")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for buffers in (self.head_keys, self.head_values, self.positions, self.comp_keys, self.comp_values,
                        self.comp_counts):
            for h, t in enumerate(buffers):
                if t is not None:
                    buffers[h] = t.index_select(0, beam_idx.to(t.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for buffers in (self.head_keys, self.head_values, self.positions, self.comp_keys, self.comp_values,
                        self.comp_counts):
            for h, t in enumerate(buffers):
                if t is not None:
                    buffers[h] = t.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        for buffers in (self.head_keys, self.head_values, self.positions, self.comp_keys, self.comp_values,
                        self.comp_counts):
            for h, t in enumerate(buffers):
                if t is not None:
                    buffers[h] = t[indices]


class KVCache(Cache):
    """A cache whose layers keep, per KV head, only the tokens `policy` keeps (see the module docstring).

    `scratch` holds per-step state a policy shares across layers (TidalDecode's selected positions)."""

    def __init__(self, policy):
        super().__init__(layer_class_to_replicate=KVLayer)
        self.policy = policy
        self.scratch: dict = {}

    def lengths(self) -> list[list[int]]:
        """Tokens held per layer and KV head."""
        return [layer.lengths() for layer in self.layers]

    def __repr__(self):
        return f"KVCache(policy={self.policy!r}, layers={len(self.layers)}, seen={self.get_seq_length()})"


def cache_bytes(cache) -> int:
    """Bytes of tensor data a cache really holds: a `KVCache`, or any transformers `Cache` (its layers'
    tensors, quantized ones included, each storage counted once)."""
    if isinstance(cache, KVCache):
        return sum(layer.nbytes() for layer in cache.layers)
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a transformers Cache, got {type(cache).__name__}")
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, Tensor) and t.numel():
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    layers = list(cache.layers)
    for sub in ("self_attention_cache", "cross_attention_cache"):  # EncoderDecoderCache
        if hasattr(cache, sub):
            layers += list(getattr(cache, sub).layers)
    for layer in layers:
        for value in vars(layer).values():
            if isinstance(value, (list, tuple)):
                for item in value:
                    add(item)
            else:
                add(value)
    return total
