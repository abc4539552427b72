"""Block-causal (frame-causal) attention: bidirectional inside a frame, causal across frames.

Next-Frame Diffusion ("Playing with Transformer at 30+ FPS via Next-Frame Diffusion") uses block-wise
causal attention over video frames; TC-LLaVA ("Rethinking the Transfer from Image to Video
Understanding with Temporal Considerations", arXiv 2409.03206) uses the same Frame-wise Block Causal
Attention Mask for visual tokens while text stays causal.

Rule: every position carries a non-decreasing segment id; query i sees key j iff `seg[j] <= seg[i]`.
Frames are one segment each; text tokens (an optional prefix before the frames and suffix after
them) are one segment per token, so they stay causal. Because the ids never decrease, each query
sees a prefix of the sequence, which makes the layout cheap to build for any length.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.layout import BlockLayout, _cdiv, _check_positive_int
from blockattn.patterns._grid import tile_layout

__all__ = ["segment_causal", "block_causal", "frame_segment_ids", "dual_rope_position_ids", "dual_rope"]


def _check_nonneg(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def frame_segment_ids(frame_len: int, num_frames: int, *, prefix: int = 0, suffix: int = 0) -> Tensor:
    """long `[prefix + num_frames * frame_len + suffix]`: one id per text token, one per frame."""
    frame_len, num_frames = _check_positive_int("frame_len", frame_len), _check_positive_int("num_frames", num_frames)
    prefix, suffix = _check_nonneg("prefix", prefix), _check_nonneg("suffix", suffix)
    frames = prefix + torch.arange(num_frames).repeat_interleave(frame_len)
    return torch.cat([torch.arange(prefix), frames, prefix + num_frames + torch.arange(suffix)])


def segment_causal(segment_ids: Tensor, *, q_len: int | None = None, block_q: int = 64,
                   block_k: int = 64) -> BlockLayout:
    """Layout where query i sees key j iff `segment_ids[j] <= segment_ids[i]`.

    `segment_ids`: int `[Lk]`, non-decreasing. With `q_len < Lk` the queries are the last `q_len`
    positions (bottom-right aligned: a chunk of new frames against a KV cache).
    """
    if not isinstance(segment_ids, Tensor) or segment_ids.dim() != 1 or segment_ids.dtype.is_floating_point \
            or segment_ids.dtype == torch.bool:
        raise ValueError("segment_ids must be a 1D integer tensor [Lk]")
    k_len = _check_positive_int("len(segment_ids)", len(segment_ids))
    q_len = k_len if q_len is None else _check_positive_int("q_len", q_len)
    if q_len > k_len:
        raise ValueError(f"q_len must not exceed len(segment_ids)={k_len}, got {q_len}")
    seg = segment_ids.long().cpu()
    if bool((seg[1:] < seg[:-1]).any()):
        raise ValueError("segment_ids must be non-decreasing")
    # last key each position may see: the end of its segment
    last_key = torch.searchsorted(seg, seg, right=True) - 1
    offset = k_len - q_len
    q_last = last_key[offset:]
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    block_end = torch.nn.functional.pad(q_last, (0, n_q * block_q - q_len), value=-1).view(n_q, block_q).amax(1)
    candidates = (torch.arange(n_k).view(1, -1) <= (block_end // block_k).view(-1, 1))[None]

    def allowed(h, q_idx, k_idx):
        return k_idx <= q_last[q_idx]

    return tile_layout(q_len, k_len, block_q, block_k, candidates, allowed)


def block_causal(frame_len: int, num_frames: int, *, prefix: int = 0, suffix: int = 0, q_len: int | None = None,
                 block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Frame-causal layout over `prefix` text tokens, `num_frames` frames of `frame_len` tokens and
    `suffix` text tokens (see the module docstring); `q_len` selects the last positions as queries."""
    return segment_causal(frame_segment_ids(frame_len, num_frames, prefix=prefix, suffix=suffix), q_len=q_len,
                          block_q=block_q, block_k=block_k)


def dual_rope_position_ids(frame_len: int, num_frames: int, *, prefix: int = 0, suffix: int = 0,
                           text_temporal: str = "nearest") -> tuple[Tensor, Tensor]:
    """TC-LLaVA's Temporal-Aware Dual RoPE position ids: `(position_ids, temporal_ids)`, long `[L]` each.

    `position_ids` is the ordinary global index (every token keeps a distinct id, so text-visual
    relative positions are preserved); `temporal_ids` is the frame index shared by all visual tokens
    of a frame. The paper does not fix the temporal id of text tokens in its public text:
    `text_temporal="nearest"` gives text 0 before the frames and `num_frames - 1` after them (the
    nearest frame); `"continue"` follows VideoRoPE's `tad_rope`, the only public reimplementation:
    prefix text `0..P-1`, frame f `P + f`, suffix text `P + F + j`.
    """
    seg = frame_segment_ids(frame_len, num_frames, prefix=prefix, suffix=suffix)
    if text_temporal == "nearest":
        before, frames, after = torch.zeros(prefix, dtype=torch.long), torch.arange(num_frames), \
            torch.full((suffix,), num_frames - 1, dtype=torch.long)
    elif text_temporal == "continue":
        before, frames, after = torch.arange(prefix), prefix + torch.arange(num_frames), \
            prefix + num_frames + torch.arange(suffix)
    else:
        raise ValueError(f"text_temporal must be 'nearest' or 'continue', got {text_temporal!r}")
    temporal = torch.cat([before, frames.repeat_interleave(frame_len), after])
    return torch.arange(len(seg)), temporal


def dual_rope(x: Tensor, position_ids: Tensor, temporal_ids: Tensor, *, base: float = 10000.0) -> Tensor:
    """Apply the dual RoPE to q or k `[..., L, D]` (D even): one rotary angle per token from the sum
    `position_ids + temporal_ids` (VideoRoPE's `tad_rope` combination: the two ids share the same
    channels), so `dual_rope(q)·dual_rope(k)` depends on the difference of the summed ids only. During
    decode both ids advance with each text token, i.e. the summed position by 2."""
    from blockattn.linear._rope import rotary

    for name, ids in (("position_ids", position_ids), ("temporal_ids", temporal_ids)):
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.shape[0] != x.shape[-2]:
            raise ValueError(f"{name} must be a 1D tensor of length L={x.shape[-2]}")
    return rotary(x, position_ids + temporal_ids, base=base)
