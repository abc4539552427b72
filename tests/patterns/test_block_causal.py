"""Block-causal / frame-causal layouts against a per-position loop, the bottom-right aligned chunk
form used with a KV cache, and the dual-RoPE position ids."""
import pytest
import torch

from blockattn import patterns


def _naive(frame_len, frames, prefix, suffix):
    """Loop over positions: text is causal; a frame token sees the prefix, earlier frames and its
    whole own frame; suffix text sees everything before it."""
    kinds = [("text", i) for i in range(prefix)] + [("frame", f) for f in range(frames) for _ in range(frame_len)] \
        + [("text", prefix + frames * frame_len + i) for i in range(suffix)]
    L = len(kinds)
    mask = torch.zeros(L, L, dtype=torch.bool)
    for i, (kind, tag) in enumerate(kinds):
        for j, (kind_j, tag_j) in enumerate(kinds):
            if j <= i:
                mask[i, j] = True
            elif kind == "frame" and kind_j == "frame" and tag_j == tag:
                mask[i, j] = True
    return mask


@pytest.mark.parametrize("frame_len,frames,prefix,suffix,block", [(5, 4, 3, 2, 8), (16, 3, 0, 0, 16), (7, 5, 0, 9, 16),
                                                                  (1, 20, 2, 0, 4), (30, 2, 1, 1, 64)])
def test_block_causal_matches_naive(frame_len, frames, prefix, suffix, block):
    expected = _naive(frame_len, frames, prefix, suffix)
    layout = patterns.block_causal(frame_len, frames, prefix=prefix, suffix=suffix, block_q=block, block_k=block)
    assert torch.equal(layout.to_token_mask()[0, 0], expected)
    L = expected.shape[0]
    for q_len in (1, frame_len, L // 2 + 1):  # chunk of the last q_len positions against the cache
        chunk = patterns.block_causal(frame_len, frames, prefix=prefix, suffix=suffix, q_len=q_len, block_q=block,
                                      block_k=block)
        assert torch.equal(chunk.to_token_mask()[0, 0], expected[L - q_len:])


def test_segment_causal_general_and_errors():
    seg = torch.tensor([0, 0, 1, 1, 1, 4, 4, 9])
    mask = patterns.segment_causal(seg, block_q=4, block_k=4).to_token_mask()[0, 0]
    assert torch.equal(mask, seg.view(1, -1) <= seg.view(-1, 1))
    with pytest.raises(ValueError, match="non-decreasing"):
        patterns.segment_causal(torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="segment_ids"):
        patterns.segment_causal(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="q_len"):
        patterns.segment_causal(seg, q_len=9)
    with pytest.raises(ValueError, match="frame_len"):
        patterns.block_causal(0, 3)
    with pytest.raises(ValueError, match="prefix"):
        patterns.block_causal(4, 3, prefix=-1)


def test_dual_rope_position_ids():
    pos, temporal = patterns.dual_rope_position_ids(3, 4, prefix=2, suffix=1)
    assert torch.equal(pos, torch.arange(2 + 12 + 1))
    assert temporal.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
