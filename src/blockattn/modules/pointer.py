"""Pointer Networks: additive attention whose distribution is the output (a pointer to an input position).

Vinyals, Fortunato, Jaitly, "Pointer Networks" (NeurIPS 2015, arXiv 1506.03134). With encoder
states `e_1..e_n` and decoder state `d_i`:

    u^i_j = v^T tanh(W1 e_j + W2 d_i),    p(C_i | C_<i, P) = softmax_j(u^i_j).

The softmax is not used to blend values, so there is nothing for the attention engine to
compute: `PointerAttention` returns the logits `u` (masked positions set to -inf) and the caller
takes `log_softmax` (a loss, or a greedy argmax). Paper setting: single-layer LSTM encoder and
decoder with 256 or 512 hidden units; `PointerNetwork` is that model with the decoder fed the
embedding of the previously pointed input (a learned start vector at step 0) and, for
permutation outputs, already selected positions masked (`mask_selected=True`).
Memory: each decoder step scores the n encoder positions, `[B, n, hidden]`; a whole decode
costs `[B, steps, n]` logits, which is the model's output.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from blockattn.modules._block_checks import check_positive_int, check_same_device_dtype, check_tensor

__all__ = ["PointerAttention", "PointerNetwork"]


class PointerAttention(nn.Module):
    """Additive pointer scores `u_j = v^T tanh(W1 e_j + W2 d)` over encoder positions."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = check_positive_int("hidden", hidden)
        self.w1 = nn.Linear(hidden, hidden, bias=False)
        self.w2 = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, 1, bias=False)

    def forward(self, encoder: Tensor, decoder: Tensor, selected: Tensor | None = None, *,
                encoder_proj: Tensor | None = None) -> Tensor:
        """encoder `[B, n, h]`, decoder `[B, h]` (one step) or `[B, T, h]`; `selected` bool `[B, n]` or
        `[B, T, n]`, True where the position may not be pointed to. Returns logits `[B, n]` or `[B, T, n]`.
        `encoder_proj` (`W1 e`, from `project_encoder`) skips recomputing it at every decoder step."""
        check_tensor("encoder", encoder, 3, f"[B, n, h={self.hidden}]", d2=self.hidden)
        check_same_device_dtype(self, "encoder", encoder)
        b, n, _ = encoder.shape
        if not isinstance(decoder, Tensor):
            raise TypeError(f"decoder must be a torch.Tensor, got {type(decoder).__name__}")
        if decoder.dim() not in (2, 3) or decoder.shape[0] != b or decoder.shape[-1] != self.hidden:
            raise ValueError(f"decoder must have shape [B={b}, h={self.hidden}] or [B={b}, T, h={self.hidden}], "
                             f"got {list(decoder.shape)}")
        if decoder.dtype != encoder.dtype or decoder.device != encoder.device:
            raise TypeError(f"decoder must share encoder's dtype and device ({encoder.dtype}, {encoder.device})")
        proj = self.project_encoder(encoder) if encoder_proj is None else encoder_proj
        if decoder.dim() == 2:
            logits = self.v(torch.tanh(proj + self.w2(decoder)[:, None])).squeeze(-1)
        else:
            logits = self.v(torch.tanh(proj[:, None] + self.w2(decoder)[:, :, None])).squeeze(-1)
        if selected is not None:
            if not isinstance(selected, Tensor) or selected.dtype != torch.bool:
                raise TypeError("selected must be a bool tensor")
            if selected.shape != logits.shape:
                raise ValueError(f"selected must have shape {list(logits.shape)}, got {list(selected.shape)}")
            logits = logits.masked_fill(selected, float("-inf"))
        return logits

    def project_encoder(self, encoder: Tensor) -> Tensor:
        return self.w1(encoder)


class PointerNetwork(nn.Module):
    """LSTM encoder-decoder whose decoder points at input positions.

    `forward(points, targets)` teacher-forces the decoder on `targets` `[B, T]` (input indices) and
    returns logits `[B, T, n]`; `decode(points, steps)` greedily points and returns indices `[B, steps]`.
    """

    def __init__(self, input_dim: int, hidden: int = 256, *, mask_selected: bool = True):
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.hidden = check_positive_int("hidden", hidden)
        self.mask_selected = bool(mask_selected)
        self.embed = nn.Linear(input_dim, hidden)
        self.encoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.decoder = nn.LSTMCell(hidden, hidden)
        self.start = nn.Parameter(torch.zeros(hidden).uniform_(-0.1, 0.1))
        self.pointer = PointerAttention(hidden)

    def _encode(self, points):
        check_tensor("points", points, 3, f"[B, n, {self.input_dim}]", d2=self.input_dim)
        check_same_device_dtype(self, "points", points)
        emb = self.embed(points)
        enc, (h, c) = self.encoder(emb)
        return emb, enc, self.pointer.project_encoder(enc), (h[0], c[0])

    def _steps(self, points, steps, targets):
        emb, enc, proj, state = self._encode(points)
        b, n, _ = points.shape
        rows = torch.arange(b, device=points.device)
        selected = torch.zeros(b, n, dtype=torch.bool, device=points.device)
        step_input = self.start.expand(b, -1)
        for i in range(steps):
            state = self.decoder(step_input, state)
            logits = self.pointer(enc, state[0], selected if self.mask_selected else None, encoder_proj=proj)
            choice = logits.argmax(-1) if targets is None else targets[:, i]
            yield logits, choice
            if self.mask_selected:
                selected = selected.clone()
                selected[rows, choice] = True
            step_input = emb[rows, choice]

    def forward(self, points: Tensor, targets: Tensor) -> Tensor:
        check_tensor("points", points, 3, f"[B, n, {self.input_dim}]", d2=self.input_dim)
        if not isinstance(targets, Tensor) or targets.dtype != torch.long:
            raise TypeError("targets must be a long tensor of input indices [B, T]")
        if targets.dim() != 2 or targets.shape[0] != points.shape[0]:
            raise ValueError(f"targets must have shape [B={points.shape[0]}, T], got {list(targets.shape)}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= points.shape[1]):
            raise ValueError(f"targets must index the {points.shape[1]} input positions")
        if self.mask_selected and targets.shape[1] > points.shape[1]:
            raise ValueError("with mask_selected=True, targets may point at most n times")
        return torch.stack([logits for logits, _ in self._steps(points, targets.shape[1], targets)], dim=1)

    @torch.no_grad()
    def decode(self, points: Tensor, steps: int | None = None) -> Tensor:
        check_tensor("points", points, 3, f"[B, n, {self.input_dim}]", d2=self.input_dim)
        steps = points.shape[1] if steps is None else check_positive_int("steps", steps)
        if self.mask_selected and steps > points.shape[1]:
            raise ValueError("with mask_selected=True, steps must not exceed the number of inputs")
        return torch.stack([choice for _, choice in self._steps(points, steps, None)], dim=1)
