"""NFD-style frame model: cached frame-by-frame (and chunked) outputs equal full recomputation with
the block-causal mask. Speculative generation: when the actions change every frame, it keeps exactly
the frames a step-by-step run makes (each chunk keeps only its first frame); when they stay constant,
the accepted frames are those of a joint denoising of the whole chunk (later frames attend to the
chunk's noisy earlier frames), which differ from step-by-step frames after the first."""
import pytest
import torch

from blockattn.modules import FrameKVCache, NextFrameTransformer
from blockattn.patterns import block_causal
from tests.patterns.helpers import masked_attention


def _model():
    torch.manual_seed(0)
    return NextFrameTransformer(dim=16, heads=2, layers=2, frame_len=5, backend="torch").double().eval()


def _dense_forward(model, x):
    """Full recomputation, every attention a dense float64 softmax under the block-causal token mask."""
    frames = x.shape[1] // model.frame_len
    mask = block_causal(model.frame_len, frames, block_q=8, block_k=8).to_token_mask()
    for block in model.blocks:
        b, L, d = x.shape
        q, k, v = block.qkv(block.norm1(x)).view(b, L, 3, block.heads, d // block.heads).permute(2, 0, 3, 1, 4)
        x = x + block.proj(masked_attention(q, k, v, mask).transpose(1, 2).reshape(b, L, d))
        x = x + block.mlp(block.norm2(x))
    return x


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1], [2, 1, 3], [6], [3, 3]])
def test_cached_equals_full(chunks):
    model = _model()
    x = torch.randn(2, 6 * model.frame_len, 16, dtype=torch.float64)
    full = _dense_forward(model, x)
    torch.testing.assert_close(model(x), full, rtol=1e-10, atol=1e-10)
    cache, outs, at = FrameKVCache(model.frame_len), [], 0
    for n in chunks:
        outs.append(model(x[:, at * model.frame_len:(at + n) * model.frame_len], cache))
        at += n
    assert cache.frames == 6
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_uncommitted_reads_and_truncate():
    model = _model()
    x = torch.randn(1, 4 * model.frame_len, 16, dtype=torch.float64)
    cache = FrameKVCache(model.frame_len)
    model(x[:, :10], cache)
    peek = model(x[:, 10:15], cache, commit=False)
    assert cache.frames == 2
    model(x[:, 10:20], cache)
    cache.truncate(3)  # drop the last frame, as a rejected speculation
    again = model(x[:, 15:20], cache)
    torch.testing.assert_close(again, _dense_forward(model, x)[:, 15:20], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(peek, _dense_forward(model, x[:, :15])[:, 10:15], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="frames"):
        cache.truncate(9)


@torch.no_grad()
def test_speculative_generation():
    model = _model()
    context = torch.randn(1, 2 * model.frame_len, 16, dtype=torch.float64)
    changing = [0, 1, 2, 3, 0, 1]
    plain, cache_plain, calls_plain = model.generate(context, changing, steps=2, speculate=1, seed=3)
    spec, cache_spec, _ = model.generate(context, changing, steps=2, speculate=3, seed=3)
    # actions change every frame: only the first frame of each speculative chunk is kept, and it
    # attends to nothing after itself, so it is exactly the step-by-step frame
    torch.testing.assert_close(spec, plain, rtol=1e-10, atol=1e-10)
    assert cache_spec.frames == cache_plain.frames == 8
    for a, b in zip(cache_spec.keys, cache_plain.keys):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    steady = [2] * 6
    frames, cache, calls = model.generate(context, steady, steps=2, speculate=3, seed=3)
    assert frames.shape == (1, 6 * model.frame_len, 16) and cache.frames == 8
    assert calls == 2 * 3 and calls_plain == 6 * 3  # fewer model calls when speculation is accepted
    first, _, _ = model.generate(context, steady, steps=2, speculate=1, seed=3)
    torch.testing.assert_close(frames[:, :model.frame_len], first[:, :model.frame_len], rtol=1e-10, atol=1e-10)
    # accepted frames = joint-chunk recomputation, not step-by-step
    n, fl = 3, model.frame_len
    x = torch.cat([model._noise(j, 1, 3, torch.float64) for j in range(n)], dim=1) \
        + model.action_embedding(torch.tensor(2)).double()
    for step in range(2):
        x = x + model.step_embedding(torch.tensor(step)).double()
        x = _dense_forward(model, torch.cat([context, x], dim=1))[:, context.shape[1]:]
    torch.testing.assert_close(frames[:, :n * fl], x, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(frames[:, fl:2 * fl], first[:, fl:2 * fl])


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="frame_len"):
        model(torch.randn(1, 7, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="speculate"):
        model.generate(torch.randn(1, 5, 16, dtype=torch.float64), [0], speculate=0)
    with pytest.raises(ValueError, match="heads"):
        NextFrameTransformer(dim=10, heads=3)
