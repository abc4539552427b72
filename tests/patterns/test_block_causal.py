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


def test_dual_rope_ids_continue_like_videorope():
    _, temporal = patterns.dual_rope_position_ids(2, 3, prefix=2, suffix=2, text_temporal="continue")
    assert temporal.tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 5, 6]
    with pytest.raises(ValueError, match="text_temporal"):
        patterns.dual_rope_position_ids(2, 3, text_temporal="zero")


def test_dual_rope_is_a_rotary_embedding_of_the_summed_ids():
    from blockattn.patterns.block_causal import dual_rope
    pos, temporal = patterns.dual_rope_position_ids(3, 4, prefix=2, suffix=3)
    q, k = torch.randn(2, 17, 8, dtype=torch.float64), torch.randn(2, 17, 8, dtype=torch.float64)
    scores = dual_rope(q, pos, temporal) @ dual_rope(k, pos, temporal).transpose(-1, -2)
    # q·k depends on the summed-id difference only: shifting both ids by constants changes nothing
    shifted = dual_rope(q, pos + 5, temporal + 2) @ dual_rope(k, pos + 5, temporal + 2).transpose(-1, -2)
    assert torch.allclose(scores, shifted)
    # and it is a real rotation by the summed id: pair (i, i + D/2) turns by (p + t) * base^(-2i/D)
    angle = (pos + temporal).double()[:, None] * 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    rotated = dual_rope(q, pos, temporal)
    assert torch.allclose(rotated[..., :4], q[..., :4] * angle.cos() - q[..., 4:] * angle.sin())
    assert torch.allclose(rotated[..., 4:], q[..., 4:] * angle.cos() + q[..., :4] * angle.sin())
    # visual tokens of one frame share the temporal id, so within a frame only global offsets remain
    assert not torch.allclose(scores, dual_rope(q, pos, 0 * temporal) @ dual_rope(k, pos, 0 * temporal).transpose(-1, -2))
    with pytest.raises(ValueError, match="position_ids"):
        dual_rope(q, pos[:-1], temporal)
