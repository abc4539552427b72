"""PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual
Generation Models (Zhao et al., 2025).

Rule: tokens lie on a `(T, H, W)` grid in row-major order. Visual attention is local along some
axis, which a row-major order scatters into stripes; reading the grid in another axis order (one of
the 6 permutations of T, H, W) gathers it into blocks. Per (batch, head) PARO takes the
permutation whose permuted attention is most block-concentrated: for `sample_blocks` evenly spaced
query blocks of the permuted sequence, the share of their exact attention mass that falls in their
best `density` fraction of key blocks (the paper picks the permutation per head offline from
calibration data by such a block-sparsity metric). Then, on the permuted tokens, each query block
keeps its `density` fraction of key blocks with the largest estimated mass (the softmax of the
block's mean query against every key, summed per key block) plus its own (diagonal) block.
`quant_bits` (8 or 4) estimates with per-block symmetric low-bit q and k, the paper's low-bit QK.

Two ways to use it: `attend(q, k, v, grid=...)` permutes q/k/v, runs the engine on the block layout
of the permuted tokens and undoes the permutation; `select(q, k, grid=...)` returns the same token
mask in the original order (tiles carry explicit masks), so `sparse_attention` works unchanged.
Without `grid` the sequence is one axis and the permutation is the identity. `causal=True` (LLM
use) removes future keys in the original order; `attend` then uses the `select` layout.

Check done: permutation choice, selection and the token mask equal a float64 loop implementation
of this rule in tests/methods/test_paro.py, and on a synthetic input local along T the chosen order
is more block-diagonal than the identity. Not run side by side with the official code
(thu-nics/PAROAttention), which calibrates offline on CUDA.

Offline plans (the paper's mode): `calibrate({layer: (q, k)}, grid, path=...)` runs once on sample q/k
of each layer and writes a JSON plan of one axis order and one block mask per (layer, head);
`methods.get("paro", plan=PATH)` then reuses it in `select(q, k, grid=..., layer=i)` with nothing
estimated online, as the official pipelines load `permute_plan` / `sparse_plan`. The official
calibration code (thu-nics/PAROAttention) was not available here (the hardware repository,
jamescsq47/PAROAtten, only loads finished plans, and the paper's method section could not be read
either), so the rule follows what the paper's abstract and its authors' summary state (the order is
chosen per head offline by a block-sparsity metric, and the mask from offline per-block attention
sums against a threshold that sets the density), filled in as follows: per head, the order kept is the one whose calibration attention is most block-concentrated (the
share of each permuted query block's exact attention mass inside its best `density` fraction of
key blocks, averaged over query blocks and samples, as `concentration` does online); the mask keeps
the key blocks whose mean calibration mass passes a per-layer threshold, set so the layer keeps a
`density` fraction of its candidate blocks (so heads with concentrated attention keep fewer), plus
each query block's own block. Deliberate differences from the official plans: one mask for all
timesteps (they keep 10 timestep groups), no dense text-token segment, no forced last row and
column of blocks, no quantization-error metric in the order choice (the paper has one for its
INT8/INT4 groups). Checked in tests/methods/test_paro_calibration.py: the per-order scores and the
masks equal a float64 re-creation of this rule, and synthetic heads built block-diagonal under each
of the 6 orders get that order. With a plan the layout does not depend on the input at all.

Causality (`causal=True`): the block mask is block-granular (a query block's mean query scores
the keys) and the permutation is chosen from sampled blocks of the whole prompt, so in prefill
later tokens can change earlier tokens' key sets (never letting them see a later key); with a
1-D sequence the permutation is the identity and only the first effect remains.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import torch
from torch import Tensor

import blockattn
from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn.methods._labels import label_layout
from blockattn import _checks
from blockattn._checks import check_qk, int_tuple_arg
from blockattn.methods._select import expand_kv_heads
from blockattn.methods.base import Method

#: the 6 axis orders, outermost axis first ("thw" is the row-major identity)
ORDERS = ("thw", "twh", "htw", "hwt", "wth", "wht")


def order_indices(grid, order: str, device=None) -> Tensor:
    """`[L]` original token index at each position of the sequence read in axis `order`."""
    ids = torch.arange(math.prod(grid), device=device).view(*grid)
    return ids.permute(*("thw".index(axis) for axis in order)).reshape(-1)


def quantize(x: Tensor, bits: int, block: int) -> Tensor:
    """Per-block symmetric fake quantization of `[..., L, D]` to `bits` (dequantized values)."""
    length = x.shape[-2]
    n = -(-length // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, n * block - length))
    blocks = padded.view(*x.shape[:-2], n, block * x.shape[-1])
    levels = 2 ** (bits - 1) - 1
    step = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12) / levels
    return ((blocks / step).round().clamp(-levels, levels) * step).view_as(padded)[..., :length, :]


@register("paro")
@dataclasses.dataclass
class PAROAttention(Method):
    """Args:
        density: fraction of key blocks each query block keeps, in (0, 1]. Paper evaluates 0.5, 0.3, 0.2.
        block_size: block (and tile) size in tokens. Paper: 64.
        sample_blocks: permuted query blocks whose exact attention scores each permutation.
        quant_bits: None, 8 or 4: estimate block importance with low-bit q and k.
        causal: LLM use (no future keys in the original order).
        plan: path of a JSON plan written by `calibrate`: per-(layer, head) orders and block masks
            used as they are (`select(..., layer=i)`), with nothing estimated online.
    """

    within_block_lookahead = True  # a query block's mean query picks its key blocks
    density: float = 0.5
    block_size: int = 64
    sample_blocks: int = 8
    quant_bits: int | None = None
    causal: bool = False
    plan: str | None = None

    grid_dims = 3
    any_lengths = False

    def __post_init__(self):
        _checks.fraction_arg("density", self.density)
        self.check_positive_ints("block_size", "sample_blocks")
        if self.quant_bits is not None:
            _checks.choice_arg("quant_bits", _checks.int_arg("quant_bits", self.quant_bits), (None, 8, 4))
        _checks.bool_arg("causal", self.causal)
        if self.plan is not None:
            plan = load_plan(self.plan)
            if plan["block_size"] != self.block_size:
                raise ValueError(f"plan {self.plan!r} was calibrated with block_size={plan['block_size']}; "
                                 f"got block_size={self.block_size}")

    def _grid(self, q: Tensor, k: Tensor, grid):
        check_qk(q, k)
        length = q.shape[2]
        if k.shape[2] != length:
            raise ValueError(f"paro is self-attention: q_len ({length}) must equal k_len ({k.shape[2]})")
        if grid is None:
            return (length, 1, 1)
        grid = int_tuple_arg("grid", grid, 3)
        if math.prod(grid) != length:
            raise ValueError(f"grid {tuple(grid)} has {math.prod(grid)} tokens but the sequence has {length}")
        return tuple(grid)

    def _keep(self, allowed_count: Tensor) -> Tensor:
        return (allowed_count * self.density).ceil().clamp(min=1).long()

    def concentration(self, q: Tensor, k: Tensor, order: Tensor) -> Tensor:
        """`[B, Hq]`: mean share of the sampled permuted query blocks' attention mass inside their best
        `density` fraction of key blocks, for the token order `order [L]`."""
        batch, heads, length, dim = q.shape
        block = self.block_size
        n_blocks = -(-length // block)
        keys = expand_kv_heads(k.float(), heads)
        position = torch.empty(length, dtype=torch.long, device=q.device)
        position[order] = torch.arange(length, device=q.device)
        key_block = position // block
        # the sampled blocks are loop bounds: they stay on the CPU
        sampled = torch.linspace(0, n_blocks - 1, min(self.sample_blocks, n_blocks)).round().long().unique()
        total = torch.zeros(batch, heads, device=q.device)
        for qb in sampled.tolist():
            rows = order[qb * block:(qb + 1) * block]
            scores = q[:, :, rows].float() @ keys.transpose(-1, -2) * dim ** -0.5
            allowed = torch.ones(len(rows), length, dtype=torch.bool, device=q.device)
            if self.causal:
                allowed = torch.arange(length, device=q.device).view(1, -1) <= rows.view(-1, 1)
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            mass = torch.zeros(batch, heads, len(rows), n_blocks, device=q.device).index_add_(3, key_block, probs).mean(2)
            candidates = torch.zeros(n_blocks, dtype=torch.bool, device=q.device)
            candidates[key_block[allowed.any(0)]] = True
            keep = int(self._keep(candidates.sum()))
            total += mass.topk(keep, dim=-1).values.sum(-1)
        return total / len(sampled)

    def permutation(self, q: Tensor, k: Tensor, grid=None) -> tuple[Tensor, list]:
        """(order `[B, Hq, L]`: the original token index at each permuted position, and the chosen
        axis-order names `[B][Hq]`). With a one-axis grid every order is the identity."""
        grid = self._grid(q, k, grid)
        batch, heads, length, _ = q.shape
        unique = _distinct_orders(grid)
        if len(unique) == 1:
            order = torch.arange(length, device=q.device).expand(batch, heads, length)
            return order, [["thw"] * heads for _ in range(batch)]
        scores = torch.stack([self.concentration(q, k, order_indices(grid, name, q.device)) for name in unique], -1)
        best = scores.argmax(-1)  # first order wins ties, so the identity is kept unless another is better
        orders = torch.stack([order_indices(grid, name, q.device) for name in unique])
        return orders[best], [[unique[int(i)] for i in row] for row in best]

    def block_mask(self, q: Tensor, k: Tensor, order: Tensor) -> Tensor:
        """bool `[B, Hq, nQ, nK]`: the key blocks each query block keeps, in the permuted order `order [B, Hq, L]`."""
        batch, heads, length, dim = q.shape
        block = self.block_size
        n_blocks = -(-length // block)
        keys = expand_kv_heads(k.float(), heads)
        queries = q.float()
        if self.quant_bits:
            queries, keys = quantize(queries, self.quant_bits, block), quantize(keys, self.quant_bits, block)
        index = order.unsqueeze(-1).expand(-1, -1, -1, dim)
        q_perm, k_perm = queries.gather(2, index), keys.gather(2, index)
        pad = n_blocks * block - length
        sizes = torch.nn.functional.pad(torch.ones(length, device=q.device), (0, pad)).view(n_blocks, block).sum(-1)
        pooled = torch.nn.functional.pad(q_perm, (0, 0, 0, pad)).view(batch, heads, n_blocks, block, dim).sum(3) \
            / sizes.view(1, 1, -1, 1)
        scores = pooled @ k_perm.transpose(-1, -2) * dim ** -0.5  # [B, H, nQ, L]
        if self.causal:
            # a key is a candidate when it precedes the block's last query in the original order
            last = torch.nn.functional.pad(order, (0, pad), value=-1).view(batch, heads, n_blocks, block).amax(-1)
            scores = scores.masked_fill(order.unsqueeze(2) > last.unsqueeze(-1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        key_block = (torch.arange(length, device=q.device) // block).expand(batch, heads, n_blocks, length)
        mass = torch.zeros(batch, heads, n_blocks, n_blocks, device=q.device).scatter_add_(3, key_block, probs)
        allowed = torch.zeros(batch, heads, n_blocks, n_blocks, device=q.device).scatter_add_(
            3, key_block, (scores > float("-inf")).float()) > 0
        diagonal = torch.eye(n_blocks, dtype=torch.bool, device=q.device).expand_as(allowed)
        keep = self._keep(allowed.sum(-1))
        # one ranking per row: the diagonal block first, then allowed blocks by mass; keep the first `keep`
        keyed = mass.masked_fill(~allowed, float("-inf")).masked_fill(diagonal, float("inf"))
        order = keyed.argsort(dim=-1, descending=True, stable=True)
        ranked = torch.arange(n_blocks, device=q.device).expand_as(order) < keep.unsqueeze(-1)
        return torch.zeros_like(allowed).scatter_(-1, order, ranked) & (allowed | diagonal)

    def _orders_and_blocks(self, q: Tensor, k: Tensor, grid, layer) -> tuple[Tensor, Tensor]:
        """(order `[B, Hq, L]`, block mask `[B, Hq, nQ, nK]` on the permuted tokens): from the plan, or online."""
        if self.plan is None:
            order, _ = self.permutation(q, k, grid)
            return order, self.block_mask(q, k, order)
        grid = self._grid(q, k, grid)
        plan = load_plan(self.plan)
        if tuple(plan["grid"]) != grid:
            raise ValueError(f"grid {grid} does not match the plan's grid {tuple(plan['grid'])} ({self.plan!r})")
        if plan["causal"] != self.causal:
            raise ValueError(f"causal={self.causal} but the plan {self.plan!r} was calibrated with "
                             f"causal={plan['causal']}")
        if q.shape[1] != plan["heads"]:
            raise ValueError(f"q has {q.shape[1]} heads but the plan {self.plan!r} has {plan['heads']} heads per layer")
        if layer is None:
            raise ValueError(f"paro with plan={self.plan!r} needs layer= (the plan holds one entry per layer)")
        if layer not in plan["tensors"]:
            raise ValueError(f"layer {layer} is not in the plan {self.plan!r}; its layers are "
                             f"{sorted(plan['tensors'])}")
        order, blocks = plan["tensors"][layer]
        batch = q.shape[0]
        return (order.to(q.device).expand(batch, -1, -1), blocks.to(q.device).expand(batch, -1, -1, -1))

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        """The selected token mask in the original token order, `[B, Hq]` heads."""
        order, blocks = self._orders_and_blocks(q, k, grid, layer)
        position = torch.empty_like(order).scatter_(2, order, torch.arange(q.shape[2], device=q.device).expand_as(order))
        labels = position // self.block_size
        return label_layout(labels, labels, blocks, block_q=self.block_size, block_k=self.block_size,
                            causal=self.causal)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grid=None, *, scale: float | None = None,
               backend: str = "auto", layer: int | None = None) -> Tensor:
        """Attention over the PARO selection: permute q/k/v per head, attend over the block layout of
        the permuted tokens, undo the permutation. Returns `[B, Hq, L, D]` in the original order.
        `layer` picks the plan's entry when the method has a plan."""
        if self.causal:
            return blockattn.attention(q, k, v, self.select(q, k, grid=grid, layer=layer), scale=scale,
                                       backend=backend)
        order, blocks = self._orders_and_blocks(q, k, grid, layer)
        heads, length, dim = q.shape[1], q.shape[2], q.shape[3]
        index = order.unsqueeze(-1).expand(-1, -1, -1, dim)
        q_perm = q.gather(2, index)
        k_perm = expand_kv_heads(k, heads).gather(2, index)
        v_perm = expand_kv_heads(v, heads).gather(2, index)
        layout = BlockLayout.from_dense(blocks, q_len=length, k_len=length, block_q=self.block_size,
                                        block_k=self.block_size)
        out_perm = blockattn.attention(q_perm, k_perm, v_perm, layout, scale=scale, backend=backend)
        return torch.empty_like(out_perm).scatter_(2, index, out_perm)

    # ------------------------------------------------------------------ offline calibration
    def block_masses(self, q: Tensor, k: Tensor, order: Tensor) -> Tensor:
        """`[B, Hq, nQ, nK]` float32: exact attention of the tokens read in `order [L]`, as each permuted
        query block's mean share of its rows' softmax mass in each permuted key block (rows sum to 1).
        Computed a band of query blocks at a time (O(band x L) memory)."""
        batch, heads, length, dim = q.shape
        block = self.block_size
        n_blocks = -(-length // block)
        pad = n_blocks * block - length
        keys = expand_kv_heads(k.float(), heads)[:, :, order]
        queries = q.float()[:, :, order]
        masses = torch.zeros(batch, heads, n_blocks, n_blocks, device=q.device)
        band = max(1, 512 // block)
        for first in range(0, n_blocks, band):
            stop = min(n_blocks, first + band)
            rows = slice(first * block, min(length, stop * block))
            scores = queries[:, :, rows] @ keys.transpose(-1, -2) * dim ** -0.5
            if self.causal:  # future in the original order
                scores = scores.masked_fill(order.view(1, -1) > order[rows].view(-1, 1), float("-inf"))
            probs = torch.nn.functional.pad(torch.softmax(scores, -1), (0, pad))
            per_key = probs.view(batch, heads, -1, n_blocks, block).sum(-1)     # [B, H, rows, nK]
            n_rows = per_key.shape[2]
            per_key = torch.nn.functional.pad(per_key, (0, 0, 0, (stop - first) * block - n_rows))
            sizes = (torch.arange(first * block, stop * block, device=q.device) < length).float()
            sizes = sizes.view(stop - first, block).sum(-1).view(1, 1, -1, 1)
            masses[:, :, first:stop] = per_key.view(batch, heads, stop - first, block, n_blocks).sum(3) / sizes
        return masses

    def candidate_blocks(self, order: Tensor) -> Tensor:
        """bool `[nQ, nK]`: the permuted blocks holding at least one allowed (query, key) pair."""
        length = order.shape[0]
        n_blocks = -(-length // self.block_size)
        if not self.causal:
            return torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=order.device)
        pad = n_blocks * self.block_size - length
        padded = torch.nn.functional.pad(order, (0, pad), value=-1).view(n_blocks, self.block_size)
        last_query = padded.amax(-1)
        first_key = padded.masked_fill(padded < 0, length).amin(-1)
        return first_key.view(1, -1) <= last_query.view(-1, 1)

    def calibrate(self, samples: dict, grid=None, *, path: str | None = None) -> dict:
        """The offline plan from sample q/k per layer: `samples = {layer: (q, k)}` or `{layer: [(q, k),
        ...]}` with q `[B, Hq, L, D]`, k `[B, Hkv, L, D]` (every batch entry is one sample; all layers the
        same heads and grid). Per head: the most block-concentrated axis order and the block mask on
        its permuted tokens (see the module docstring). Writes the plan as JSON to `path` when given
        and returns it: `{"method", "version", "grid", "block_size", "density", "causal", "heads",
        "layers": {layer: {"orders": [Hq names], "masks": [Hq x nQ strings of 0/1 over nK],
        "concentration": [Hq x {order: score}]}}}`."""
        if not isinstance(samples, dict) or not samples:
            raise TypeError("samples must be a non-empty dict {layer: (q, k) or [(q, k), ...]}")
        plan_layers, heads, length, dims = {}, None, None, None
        for layer, pairs in samples.items():
            _checks.int_arg("samples layer", layer, minimum=0)
            pairs = [pairs] if isinstance(pairs, tuple) else list(pairs)
            if not pairs:
                raise ValueError(f"samples[{layer}] holds no (q, k) pair")
            for q, k in pairs:
                dims = self._grid(q, k, grid)
                if heads is not None and (q.shape[1], q.shape[2]) != (heads, length):
                    raise ValueError(f"samples[{layer}] has {q.shape[1]} heads and {q.shape[2]} tokens; the other "
                                     f"samples have {heads} heads and {length} tokens")
                heads, length = q.shape[1], q.shape[2]
            names = _distinct_orders(dims)
            scores = torch.zeros(heads, len(names), dtype=torch.float64)
            masses = []
            with torch.no_grad():
                for index, name in enumerate(names):
                    order = order_indices(dims, name, pairs[0][0].device)
                    mass = sum(self.block_masses(q, k, order.to(q.device)).sum(0).double().cpu() for q, k in pairs)
                    mass = mass / sum(q.shape[0] for q, _ in pairs)                      # [Hq, nQ, nK]
                    candidates = self.candidate_blocks(order).cpu()
                    keep = self._keep(candidates.sum(-1))                                # [nQ]
                    ranked = mass.masked_fill(~candidates, -1.0).sort(-1, descending=True).values
                    within = torch.arange(ranked.shape[-1]).view(1, -1) < keep.view(-1, 1)
                    scores[:, index] = (ranked.clamp(min=0) * within).sum(-1).mean(-1)
                    masses.append(mass)
            best = scores.argmax(-1)  # the first (identity) order wins ties
            chosen = torch.stack([masses[int(b)][h] for h, b in enumerate(best)])      # [Hq, nQ, nK]
            candidates = torch.stack([self.candidate_blocks(order_indices(dims, names[int(b)])) for b in best])
            masks = self._plan_mask(chosen, candidates)
            plan_layers[str(layer)] = {
                "orders": [names[int(b)] for b in best],
                "masks": [["".join("1" if x else "0" for x in row) for row in head.tolist()] for head in masks],
                "concentration": [{n: float(scores[h, i]) for i, n in enumerate(names)} for h in range(heads)]}
        plan = {"method": "paro", "version": PLAN_VERSION, "grid": list(dims), "block_size": self.block_size,
                "density": self.density, "causal": self.causal, "heads": heads, "layers": plan_layers}
        if path is not None:
            with open(path, "w") as f:
                json.dump(plan, f)
        return plan

    def _plan_mask(self, mass: Tensor, candidates: Tensor) -> Tensor:
        """bool `[Hq, nQ, nK]`: candidate blocks whose calibration mass reaches the layer's threshold (the
        value that keeps a `density` fraction of the layer's candidate blocks), plus the diagonal."""
        values = mass[candidates]
        count = max(1, math.ceil(self.density * values.numel()))
        threshold = values.topk(min(count, values.numel())).values[-1]
        diagonal = torch.eye(mass.shape[-1], dtype=torch.bool).expand_as(candidates)
        return (candidates & (mass >= threshold)) | diagonal


PLAN_VERSION = 1


def _distinct_orders(grid) -> list[str]:
    """The axis orders that read `grid` differently (axes of size 1 make some coincide), identity first."""
    unique, seen = [], set()
    for name in ORDERS:
        key = tuple(order_indices(grid, name).tolist())
        if key not in seen:
            seen.add(key)
            unique.append(name)
    return unique


def load_plan(path: str) -> dict:
    """The plan written by `PAROAttention.calibrate`, checked, with per-layer tensors `plan["tensors"][layer]
    = (order [Hq, L], block mask [Hq, nQ, nK])`. `ValueError` names what is wrong."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"plan must be a path (str), got {type(path).__name__}")
    path = os.fspath(path)
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as error:
        raise ValueError(f"plan {path!r} cannot be read: {error}") from error
    return _load_plan(path, stamp)


@functools.lru_cache(maxsize=8)
def _load_plan(path: str, stamp: int) -> dict:
    try:
        with open(path) as f:
            plan = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"plan {path!r} is not a readable JSON plan: {error}") from error
    need = ("method", "version", "grid", "block_size", "density", "causal", "heads", "layers")
    if not isinstance(plan, dict) or any(key not in plan for key in need) or plan["method"] != "paro":
        raise ValueError(f"plan {path!r} is not a paro plan (needs keys {list(need)}, method 'paro')")
    if plan["version"] != PLAN_VERSION:
        raise ValueError(f"plan {path!r} has version {plan['version']}; this code reads version {PLAN_VERSION}")
    grid = tuple(plan["grid"])
    if len(grid) != 3 or not all(isinstance(n, int) and n > 0 for n in grid):
        raise ValueError(f"plan {path!r}: grid must be 3 positive ints, got {plan['grid']!r}")
    length, block, heads = math.prod(grid), plan["block_size"], plan["heads"]
    n_blocks = -(-length // block)
    allowed = set(_distinct_orders(grid))
    tensors = {}
    for key, entry in plan["layers"].items():
        orders, masks = entry.get("orders"), entry.get("masks")
        if not isinstance(orders, list) or len(orders) != heads or not set(orders) <= allowed:
            raise ValueError(f"plan {path!r} layer {key}: orders must be {heads} heads' names from "
                             f"{sorted(allowed)}, got {orders!r}")
        if not isinstance(masks, list) or len(masks) != heads or any(
                len(rows) != n_blocks or any(len(r) != n_blocks or set(r) - {"0", "1"} for r in rows)
                for rows in masks):
            raise ValueError(f"plan {path!r} layer {key}: masks must be {heads} heads x {n_blocks} rows of "
                             f"{n_blocks} '0'/'1' characters (heads x query blocks x key blocks)")
        order = torch.stack([order_indices(grid, name) for name in orders])
        blocks = torch.tensor([[[c == "1" for c in row] for row in rows] for rows in masks], dtype=torch.bool)
        tensors[int(key)] = (order, blocks)
    return {**plan, "grid": grid, "tensors": tensors}
