"""The hook API: observe and edit attention heads of a model patched with `blockattn.hf.patch`.

The patched attention function hands every layer's call (post-RoPE `q [B, Hq, Lq, D]`, `k, v [B, Hkv, Lk,
D]`, the engine's output `[B, Hq, Lq, D]`, i.e. the per-head outputs before `o_proj`) to the model's
`Hooks` object when one is installed; without one the patched forward does one attribute lookup more.

    with analysis.hooks(model) as h:
        h.record_rows(range(95, 100))            # attention rows of these query positions, every layer
        h.record_outputs(layers=[3])             # per-head outputs before o_proj
        h.ablate({(3, 5): "zero"})               # replace head 5 of layer 3's output
        h.perturb({(7, 1): 0.5})                 # A <- (1 - u) A + u I for head 1 of layer 7
        model(ids)
    h.rows[3][0].probs                           # [B, Hq, 5, Lk]

Positions are indices into the keys a layer sees (cache positions): with `Lq < Lk` the queries are the
last `Lq` positions (bottom-right aligned, as the engine and a KV cache have it). Rows are computed from
q and k on demand, only for the requested positions (`[n, Lk]` per head, never `[Lq, Lk]` for a whole
prompt), with the model's own rule: causal, its sliding window, its padding mask. They are the dense
softmax rows, which is what the model computes when patched with "dense" (a sparse method computes
them restricted to its layout). Rows and outputs are what the call computed before any edit of that
same head; outputs are recorded after the edits (they are what enters `o_proj`).

Edits of a head's output (`ablate`): "zero"; "uniform" (the head attends uniformly over the keys it may
see: Wu et al.'s masking, q = 0, in "Retrieval Head Mechanistically Explains Long-Context Factuality");
a tensor broadcast to `[B, Lq, D]` (a `[D]` mean is mean-ablation); or a callable `f(out [B, Lq, D])`
returning one. Edit of a head's attention (`perturb`, SoftPAG in Ahn et al., "Fine-Grained Perturbation
Guidance via Attention Head Selection"): A <- (1 - u) A + u I, where I is the diagonal layout (each query
keeps its own value), so the head's output becomes exactly (1 - u) out + u v_self.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from blockattn.integrations import hf


class Rows(NamedTuple):
    """One call's recorded attention rows for one layer.

    positions: `[n]` the query positions (long, on the model's device).
    probs: `[B, Hq, n, Lk]` float32 probabilities, or with `top_k` the top values `[B, Hq, n, k]`.
    indices: with `top_k`, the key positions of those values `[B, Hq, n, k]`; else None.
    """
    positions: Tensor
    probs: Tensor
    indices: Tensor | None


_OUTPUT_EDITS = ("zero", "uniform")


class Hooks:
    """Installed on every patched attention layer of `model` until `remove()` (or the end of a `with`)."""

    def __init__(self, model):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module patched with blockattn.hf.patch, got "
                            f"{type(model).__name__}")
        if getattr(model, "_blockattn_previous", None) is None:
            raise ValueError("model is not patched by blockattn: call blockattn.hf.patch(model, 'dense') first "
                             "(the hooks live in the patched attention function)")
        if hasattr(model, "_blockattn_kv_hook"):
            raise ValueError("model is patched with a kv= policy; its cache holds only the kept tokens, so cache "
                             "positions are not token positions: patch it without kv= for analysis")
        self.modules = [m for m in hf.attention_modules(model) if hasattr(m, hf._PLAN_ATTR)]
        if any(hasattr(m, hf.HOOKS_ATTR) for m in self.modules):
            raise ValueError("model already has blockattn.analysis hooks installed; remove() them first")
        config = getattr(model.config, "get_text_config", lambda: model.config)()
        self.layers = 1 + max(m.layer_idx for m in self.modules)
        self.heads = int(config.num_attention_heads)
        self.rows: dict[int, list[Rows]] = {}
        self.outputs: dict[int, list[Tensor]] = {}
        self._row_positions: Tensor | None = None
        self._row_layers: set[int] | None = None
        self._top_k: int | None = None
        self._output_layers: set[int] | None = None
        self._output_positions: Tensor | None = None
        self._recording_outputs = False
        self._edits: dict[int, dict[int, object]] = {}
        self.model = model
        for module in self.modules:
            setattr(module, hf.HOOKS_ATTR, self)

    # ------------------------------------------------------------------------------------ requests
    def record_rows(self, positions, *, layers=None, top_k: int | None = None) -> None:
        """Record, in every later call, the attention rows of the query `positions` found in it.

        positions: an int, a sequence/range of ints or a 1-D integer tensor (cache positions).
        layers: the layers to record (default every layer).
        top_k: keep only the `top_k` largest probabilities per row and their key positions.
        """
        self._row_positions = _positions("positions", positions)
        self._row_layers = self._layer_set(layers)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k must be None or an int, got {type(top_k).__name__}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k}")
        self._top_k = top_k

    def record_outputs(self, *, layers=None, positions=None) -> None:
        """Record every later call's per-head outputs before `o_proj`, `[B, Hq, n, D]` per call, for the
        query `positions` found in it (default: all of the call's queries)."""
        self._output_layers = self._layer_set(layers)
        self._output_positions = None if positions is None else _positions("positions", positions)
        self._recording_outputs = True

    def ablate(self, heads: dict) -> None:
        """Replace head outputs: `{(layer, head): "zero" | "uniform" | Tensor | callable}` (see the module
        docstring); replaces any earlier edit of the same head."""
        if not isinstance(heads, dict):
            raise TypeError(f"heads must be a dict {{(layer, head): edit}}, got {type(heads).__name__}")
        for key, edit in heads.items():
            layer, head = self._head_key(key)
            if isinstance(edit, str):
                if edit not in _OUTPUT_EDITS:
                    raise ValueError(f"ablation of head {key} must be one of {list(_OUTPUT_EDITS)}, a tensor or a "
                                     f"callable, got {edit!r}")
            elif isinstance(edit, Tensor):
                if not edit.is_floating_point():
                    raise TypeError(f"replacement for head {key} must be a floating tensor, got {edit.dtype}")
            elif not callable(edit):
                raise TypeError(f"ablation of head {key} must be a string, a tensor or a callable, got "
                                f"{type(edit).__name__}")
            self._edits.setdefault(layer, {})[head] = edit

    def perturb(self, heads: dict) -> None:
        """Interpolate head attention toward identity: `{(layer, head): u}` with u in [0, 1] (0: unchanged,
        1: PAG's identity attention); replaces any earlier edit of the same head."""
        if not isinstance(heads, dict):
            raise TypeError(f"heads must be a dict {{(layer, head): strength}}, got {type(heads).__name__}")
        for key, strength in heads.items():
            layer, head = self._head_key(key)
            if isinstance(strength, bool) or not isinstance(strength, (int, float)):
                raise TypeError(f"strength of head {key} must be a number in [0, 1], got {type(strength).__name__}")
            if not 0.0 <= strength <= 1.0 or math.isnan(strength):
                raise ValueError(f"strength of head {key} must be in [0, 1], got {strength}")
            self._edits.setdefault(layer, {})[head] = _Identity(float(strength))

    def restore(self) -> None:
        """Drop every edit (recordings go on)."""
        self._edits = {}

    def clear(self) -> None:
        """Forget what was recorded (requests stay)."""
        self.rows, self.outputs = {}, {}

    def mean_outputs(self) -> Tensor:
        """`[layers, Hq, D]`: each head's recorded output averaged over batch and positions (the mean for
        mean-ablation); every layer must have recorded outputs."""
        missing = [layer for layer in range(self.layers) if not self.outputs.get(layer)]
        if missing:
            raise ValueError(f"no outputs recorded for layers {missing}: call record_outputs() and run the model")
        means = []
        for layer in range(self.layers):
            total = sum(o.double().sum(dim=(0, 2)) for o in self.outputs[layer])
            count = sum(o.shape[0] * o.shape[2] for o in self.outputs[layer])
            means.append((total / count).float())
        return torch.stack(means)

    def remove(self) -> None:
        for module in self.modules:
            if getattr(module, hf.HOOKS_ATTR, None) is self:
                delattr(module, hf.HOOKS_ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # ----------------------------------------------------------------------------- the hook itself
    def __call__(self, module, query, key, value, out, attention_mask, scaling, causal, layer, window):
        q_len, k_len = query.shape[2], key.shape[2]
        offset = k_len - q_len
        if self._row_positions is not None and (self._row_layers is None or layer in self._row_layers):
            wanted = _inside(self._row_positions, offset, k_len, query.device)
            if wanted.numel():
                probs = attention_rows(query, key, wanted - offset, scaling=scaling, causal=causal, window=window,
                                       attention_mask=attention_mask)
                if self._top_k is None:
                    record = Rows(wanted, probs, None)
                else:
                    values, indices = probs.topk(min(self._top_k, k_len), dim=-1)
                    record = Rows(wanted, values, indices)
                self.rows.setdefault(layer, []).append(record)
        edits = self._edits.get(layer)
        if edits:
            out = _apply_edits(edits, out, value, offset, causal, window, attention_mask)
        if self._recording_outputs and (self._output_layers is None or layer in self._output_layers):
            if self._output_positions is None:
                kept = out.detach().clone()
            else:
                wanted = _inside(self._output_positions, offset, k_len, out.device)
                kept = out.detach()[:, :, wanted - offset].clone() if wanted.numel() else None
            if kept is not None:
                self.outputs.setdefault(layer, []).append(kept)
        return out

    # ------------------------------------------------------------------------------------- checks
    def _layer_set(self, layers) -> set[int] | None:
        if layers is None:
            return None
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        try:
            chosen = set(layers)
        except TypeError:
            raise TypeError(f"layers must be None, an int or a sequence of ints, got {type(layers).__name__}") from None
        bad = [layer for layer in chosen if isinstance(layer, bool) or not isinstance(layer, int)
               or not 0 <= layer < self.layers]
        if bad:
            raise ValueError(f"layers must be ints in [0, {self.layers}), got {bad}")
        return chosen

    def _head_key(self, key) -> tuple[int, int]:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in key)):
            raise TypeError(f"heads are keyed by (layer, head) int pairs, got {key!r}")
        layer, head = key
        if not 0 <= layer < self.layers or not 0 <= head < self.heads:
            raise ValueError(f"head {key} is outside the model's {self.layers} layers x {self.heads} query heads")
        return layer, head


def hooks(model) -> Hooks:
    """Install the hook API on a model patched with `blockattn.hf.patch` (a context manager too)."""
    return Hooks(model)


# ----------------------------------------------------------------------------------- computations
def _positions(name, positions) -> Tensor:
    if isinstance(positions, Tensor):
        if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {positions.dtype} of shape "
                             f"{list(positions.shape)}")
        values = positions.detach().cpu().long()
    else:
        if isinstance(positions, int) and not isinstance(positions, bool):
            positions = [positions]
        try:
            items = list(positions)
        except TypeError:
            raise TypeError(f"{name} must be an int, a sequence of ints or a 1-D integer tensor, got "
                            f"{type(positions).__name__}") from None
        if any(isinstance(p, bool) or not isinstance(p, int) for p in items):
            raise TypeError(f"{name} must hold ints, got {items[:5]}")
        values = torch.tensor(items, dtype=torch.long)
    if values.numel() == 0 or int(values.min()) < 0:
        raise ValueError(f"{name} must be a non-empty set of positions >= 0")
    return torch.unique(values)


def _inside(positions: Tensor, offset: int, k_len: int, device) -> Tensor:
    return positions[(positions >= offset) & (positions < k_len)].to(device)


def _bounds(pos: Tensor, k_len: int, causal: bool, window) -> tuple[Tensor, Tensor]:
    """Inclusive key range [lo, hi] each query position may see (before padding)."""
    lo = torch.zeros_like(pos)
    hi = pos.clone() if causal else torch.full_like(pos, k_len - 1)
    if window is not None:
        left, right = hf._band_rule(int(window), causal)
        lo = (pos - left).clamp(min=0)
        hi = torch.minimum(hi, pos + right).clamp(max=k_len - 1)
    return lo, hi


def attention_rows(query: Tensor, key: Tensor, rows: Tensor, *, scaling=None, causal: bool = True, window=None,
                   attention_mask: Tensor | None = None) -> Tensor:
    """`[B, Hq, n, Lk]` float32 softmax rows of the queries `query[:, :, rows]` over all of `key` (GQA
    grouped as transformers does: query head h reads KV head h // (Hq / Hkv)); `rows` index the call's
    queries, aligned to the last key positions."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    scale = dim ** -0.5 if scaling is None else float(scaling)
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query[:, :, rows].to(dtype).view(batch, kv_heads, heads // kv_heads, rows.numel(), dim)
    logits = torch.einsum("bkgnd,bkld->bkgnl", q, key.to(dtype)).reshape(batch, heads, rows.numel(), k_len) * scale
    pos = rows + (k_len - q_len)
    lo, hi = _bounds(pos, k_len, causal, window)
    j = torch.arange(k_len, device=query.device)
    keep = (j >= lo[:, None]) & (j <= hi[:, None])  # [n, Lk]
    keep = keep[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, -k_len:]
    logits = logits.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0).float()  # a row that sees no key (padding) is zeros


def uniform_outputs(value: Tensor, q_len: int, *, causal: bool = True, window=None,
                    attention_mask: Tensor | None = None) -> Tensor:
    """`[B, Hkv, Lq, D]`: each query's mean of the values it may see (uniform attention), from prefix sums
    over keys, so O(Lk) memory for a whole prompt."""
    batch, _, k_len, _ = value.shape
    pos = torch.arange(k_len - q_len, k_len, device=value.device)
    lo, hi = _bounds(pos, k_len, causal, window)
    weight = torch.ones(batch, k_len, dtype=torch.float64, device=value.device)
    if attention_mask is not None:
        weight = attention_mask[:, -k_len:].to(torch.float64)
    zero = torch.zeros(batch, value.shape[1], 1, value.shape[3], dtype=torch.float64, device=value.device)
    sums = torch.cat([zero, (value.double() * weight[:, None, :, None]).cumsum(2)], dim=2)
    counts = torch.cat([weight.new_zeros(batch, 1), weight.cumsum(1)], dim=1)
    total = sums[:, :, hi + 1] - sums[:, :, lo]
    count = (counts[:, hi + 1] - counts[:, lo]).clamp(min=1.0)
    return (total / count[:, None, :, None]).to(value.dtype)


class _Identity(NamedTuple):
    strength: float


def _apply_edits(edits: dict, out: Tensor, value: Tensor, offset: int, causal, window, attention_mask) -> Tensor:
    out = out.clone()  # the engine may keep its output for backward: edit a copy
    batch, heads, q_len, dim = out.shape
    group = heads // value.shape[1]
    uniform = None
    for head, edit in edits.items():
        kv_head = head // group
        if isinstance(edit, _Identity):
            self_values = value[:, kv_head, offset:offset + q_len].to(out.dtype)
            out[:, head] = (1.0 - edit.strength) * out[:, head] + edit.strength * self_values
        elif isinstance(edit, str) and edit == "zero":
            out[:, head] = 0
        elif isinstance(edit, str) and edit == "uniform":
            if uniform is None:
                uniform = uniform_outputs(value, q_len, causal=causal, window=window, attention_mask=attention_mask)
            out[:, head] = uniform[:, kv_head].to(out.dtype)
        else:
            replacement = edit(out[:, head]) if callable(edit) and not isinstance(edit, Tensor) else edit
            out[:, head] = _broadcast(replacement, (batch, q_len, dim), out, head)
    return out


def _broadcast(replacement, shape, out: Tensor, head: int) -> Tensor:
    if not isinstance(replacement, Tensor):
        raise TypeError(f"replacement for head {head} must be a tensor, got {type(replacement).__name__}")
    if replacement.device != out.device:
        raise ValueError(f"replacement for head {head} is on {replacement.device}, the model runs on {out.device}")
    try:
        if torch.broadcast_shapes(replacement.shape, shape) != torch.Size(shape):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"replacement for head {head} has shape {list(replacement.shape)}; it must broadcast to "
                         f"the head's output [B, Lq, D] = {list(shape)}") from None
    return replacement.to(out.dtype).expand(shape)

