"""The shape every block-selection method has: a dataclass of its paper's hyperparameters, one final
`select` that does the plumbing, and one `_select` per method that implements the paper's rule.

`Method.select(q, k, *, causal=None, grid=None, layer=None)` (kvpress's `BasePress` shape):

- validates q `[B, Hq, Lq, D]` and k `[B, Hkv, Lk, D]` once (tensors, 4-D, one device, same B and D,
  `Hq % Hkv == 0`), so `_select` and the helpers it calls trust them;
- rejects context keys it does not know, by name (`TypeError`: `casual=True` is a typo, not a no-op);
- resolves `causal`: the argument when given, else the method's `causal` field, else its default mode;
  a method whose rule has no such mode (an encoder-only or causal-only method) raises `ValueError`;
- checks `grid` (the token grid of images/videos) against the method's `grid_dims`, and `layer`;
- calls `_select(q, k, causal=..., grid=..., layer=...)` on a copy whose `causal` field, if it has
  one, holds the resolved value, so the rule's helpers can read `self.causal`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import ClassVar

import torch
from torch import Tensor

from blockattn import _checks
from blockattn.layout import BlockLayout

_CONTEXT = ("causal", "grid", "layer")


@dataclasses.dataclass
class Method:
    """Base class of a block-selection method.

    Subclasses are dataclasses whose fields are the paper's hyperparameters (defaults = the
    paper's defaults), validated in `__post_init__`, and implement `_select`. They describe
    what context they accept with the class attributes below.
    """

    #: registry name, set by @register
    name: ClassVar[str] = "method"
    #: the values of `causal` the rule is defined for; the first is the default when the method
    #: has no `causal` field. (True,) = causal-only (LLM prefill), (False,) = encoder-only.
    causal_modes: ClassVar[tuple[bool, ...]] = (True, False)
    #: dimensions of the token grid `select` accepts (2: (H, W) images, 3: (T, H, W) videos), None = none
    grid_dims: ClassVar[int | None] = None
    #: whether `select` cannot run without a grid
    needs_grid: ClassVar[bool] = False
    #: whether the layout may be built for q_len != k_len (chunked prefill, decoding)
    any_lengths: ClassVar[bool] = True
    #: whether a causal layout may have q_len > k_len (the first queries then see no key)
    queries_before_keys: ClassVar[bool] = False
    #: further keyword context this method reads (e.g. LongHeads' `v`)
    extra_context: ClassVar[tuple[str, ...]] = ()
    #: whether, in a causal prompt, a query's key set may depend on later tokens of its own query block
    #: (or, for some rules, of the prompt): the rule scores whole blocks, groups or regions of queries,
    #: as the official code does. No query sees a later key, but later tokens can change earlier outputs.
    within_block_lookahead: ClassVar[bool] = False
    #: parameters without a usable default (a trained method's weights file): registered, but left out of
    #: default sweeps (`methods.training_free()`)
    required: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "select" in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides Method.select; implement _select instead "
                            "(select validates the inputs and resolves the context for every method)")

    @typing.final
    def select(self, q: Tensor, k: Tensor, *, causal: bool | None = None, grid=None, layer: int | None = None,
               **extra) -> BlockLayout:
        """Return the layout for queries `q [B, Hq, Lq, D]` and keys `k [B, Hkv, Lk, D]`.

        Args:
            causal: causal attention (LLM prefill); None = the method's default (its `causal` field).
            grid: token grid `(H, W)` or `(T, H, W)` (row-major tokens) for image/video methods.
            layer: index of the attention layer, for methods whose rule depends on it.
        """
        unknown = sorted(set(extra) - set(self.extra_context))
        if unknown:
            known = ", ".join(_CONTEXT + tuple(self.extra_context))
            raise TypeError(f"{self.name}.select() got unknown context {unknown}; it takes {known}")
        _checks.check_qk(q, k)
        q_len, k_len = q.shape[2], k.shape[2]
        grid = self._check_grid(grid, q_len)  # first: a method that needs a grid says so before anything else
        causal = self.default_causal() if causal is None else _checks.bool_arg("causal", causal)
        self.check_causal(causal)
        if not self.any_lengths and q_len != k_len:
            raise ValueError(f"{self.name} selects for prefill (self-attention): q_len ({q_len}) must equal "
                             f"k_len ({k_len})")
        if causal and q_len > k_len and not self.queries_before_keys:
            raise ValueError(f"q_len ({q_len}) must not exceed k_len ({k_len}) for causal {self.name}")
        layer = _checks.optional_int_arg("layer", layer, minimum=0)
        method = self
        if "causal" in self.field_names() and self.causal != causal:
            method = dataclasses.replace(self, causal=causal)
        return method._select(q, k, causal=causal, grid=grid, layer=layer, **extra)

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer: int | None) -> BlockLayout:
        """The method's rule, on validated inputs and resolved context."""
        raise NotImplementedError(f"{type(self).__name__} must implement _select")

    # ------------------------------------------------------------------ context rules
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()

    def default_causal(self) -> bool:
        return bool(self.causal) if "causal" in self.field_names() else self.causal_modes[0]

    def check_causal(self, causal: bool) -> None:
        """`ValueError` saying why the method cannot serve this kind of model."""
        if causal in self.causal_modes:
            return
        if causal:
            raise ValueError(f"{self.name} is an encoder-only (bidirectional) method: its rule lets a query see "
                             "later tokens, so it cannot serve a causal model")
        raise ValueError(f"{self.name} builds causal layouts only; it cannot serve a bidirectional (encoder) model")

    def _check_grid(self, grid, length: int):
        if grid is None:
            if self.needs_grid:
                raise ValueError(f"{self.name} needs grid=({', '.join('THW'[-self.grid_dims:])}), the token grid "
                                 f"of the image/video (tokens in row-major order); a plain sequence has none")
            return None
        if self.grid_dims is None:
            raise ValueError(f"{self.name} selects on a 1-D sequence and takes no grid, got grid={grid!r}")
        grid = _checks.int_tuple_arg("grid", grid, self.grid_dims)
        if math.prod(grid) != length:
            raise ValueError(f"grid {grid} has {math.prod(grid)} tokens but the sequence has {length}")
        return grid

    def check_positive_ints(self, *names: str) -> None:
        """`TypeError`/`ValueError` naming the first of these fields that is not a positive int."""
        for name in names:
            _checks.int_arg(name, getattr(self, name))

    def params(self) -> dict:
        return dataclasses.asdict(self)


class PrefillMethod(Method):
    """A method whose rule is defined for causal LLM prefill only: causal, and q_len == k_len (its
    estimate reads the whole prompt, as queries and keys at once)."""

    causal_modes = (True,)
    any_lengths = False


@dataclasses.dataclass
class BlockScores:
    """What a `BlockScorer` scores: `scores [B, H, nR, nC]` (float, higher = more important) of groups
    of `block_q` query tokens (1: per-token gates) against groups of `block_k` keys.

    allowed: bool, broadcastable to `scores`: the blocks the rule may choose (None: all).
    forced: bool, broadcastable: blocks always kept and counted by the rule (ranked first by the
        cumulative threshold, one of the `k` of top-k).
    always: bool, broadcastable: blocks kept on top of the rule, outside its count.
    """

    scores: Tensor
    block_q: int
    block_k: int
    allowed: Tensor | None = None
    forced: Tensor | None = None
    always: Tensor | None = None


class BlockScorer(Method):
    """A method that scores blocks, then keeps them by one rule: the subclass implements
    `_score_blocks` (and `_keep_value` where the rule's parameter is not a plain field); this class
    applies the keep rule and builds the layout once.

    `keep_rule`:
    - "threshold": per row, the fewest blocks whose scores reach `_keep_value()` (a fraction, or a
      tensor broadcastable to the rows, e.g. one per head) of the row's total mass, forced blocks first
      (XAttention);
    - "top_k": per row, the `_keep_value()` best allowed blocks, forced ones among them (MoBA, LongHeads);
    - "above": every allowed block whose score exceeds `_keep_value()`, and the forced ones (SALE).

    Layout: score rows of one token (`block_q == 1`, per-token gates over key groups) become row masks
    of `tile_size` tiles (`row_gate_layout`); block rows and columns become the layout's tiles.
    """

    keep_rule: ClassVar[str] = "threshold"

    def _score_blocks(self, q: Tensor, k: Tensor, *, causal: bool, **context) -> BlockScores:
        """The method's block scores on validated inputs (`context`: its `extra_context`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _score_blocks")

    def _keep_value(self, scores: BlockScores, layer: int | None):
        """The keep rule's parameter: the threshold (fraction of mass, or score) or the k of top-k."""
        return getattr(self, "threshold" if self.keep_rule in ("threshold", "above") else "top_k")

    def keep_blocks(self, blocks: BlockScores, value) -> Tensor:
        """bool `[B, H, nR, nC]`: the blocks `keep_rule` keeps from `blocks` with parameter `value`."""
        from blockattn.methods._select import cumulative_threshold, top_k
        scores = blocks.scores
        forced = None if blocks.forced is None else blocks.forced.expand_as(scores)
        if self.keep_rule == "threshold":
            if blocks.allowed is not None:
                scores = scores.masked_fill(~blocks.allowed, 0.0)
            keep = cumulative_threshold(scores, value, forced=forced)
        elif self.keep_rule == "top_k":
            allowed = torch.ones((), dtype=torch.bool, device=scores.device) if blocks.allowed is None \
                else blocks.allowed
            keep = top_k(scores, value, allowed=allowed.expand_as(scores), forced=forced)
        elif self.keep_rule == "above":
            keep = scores > value
            if blocks.allowed is not None:
                keep = keep & blocks.allowed
            if forced is not None:
                keep = keep | forced
        else:
            raise ValueError(f"{type(self).__name__}.keep_rule must be 'threshold', 'top_k' or 'above', "
                             f"got {self.keep_rule!r}")
        return keep if blocks.always is None else keep | blocks.always

    def _layout(self, keep: Tensor, blocks: BlockScores, q: Tensor, k: Tensor, *, causal: bool) -> BlockLayout:
        q_len, k_len = q.shape[2], k.shape[2]
        if blocks.block_q == 1:
            from blockattn.methods._select import row_gate_layout
            return row_gate_layout(keep, group=blocks.block_k, k_len=k_len, tile=self.tile_size, causal=causal)
        # causal with more queries than keys: the first queries precede every key and attend to none
        return BlockLayout.from_dense(keep, q_len=q_len, k_len=k_len, block_q=blocks.block_q,
                                      block_k=blocks.block_k, causal=causal, allow_empty_rows=causal and q_len > k_len)

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer: int | None, **context) -> BlockLayout:
        blocks = self._score_blocks(q, k, causal=causal, **context)
        keep = self.keep_blocks(blocks, self._keep_value(blocks, layer))
        return self._layout(keep, blocks, q, k, causal=causal)
