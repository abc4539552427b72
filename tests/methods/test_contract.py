"""The contract every registered method keeps (kvpress's `test_presses_run` over `default_presses`):
over `methods.training_free()` x devices (trained methods in their own tests: tests/methods/test_seer.py),
a valid layout for (Lq, Lk) with GQA and batch 2, on q's device; `sparse_attention` equal to the float64 reference over that layout; `causal=True` layouts that never
see the future; bad parameters and bad context refused with the right exception.

`meta` stands in for an accelerator on machines without one: it cannot compute values, so a method
may stop there where a size depends on data (block-list widths), but never on a device mismatch.
"""
import dataclasses

import pytest
import torch

import blockattn
from blockattn import methods
from blockattn.layout import BlockLayout
from blockattn.ops.reference import reference_attention

# small hyperparameters so every rule is exercised (several blocks, groups, chunks) on 256 tokens
SMALL = dict(
    xattention=dict(block_size=32), moba=dict(block_size=64, top_k=2, tile_size=32),
    vertical_slash=dict(vertical_size=40, slash_size=60, last_q=16, block_size=32),
    hip=dict(k=64, block_size_q=32, block_size_k=32), sale=dict(block_size=32),
    anchor=dict(step=2, block_size=32, theta=2.0),
    longheads=dict(window_size=32, atten_length=96, begin_selective_length=64, tile_size=32),
    biformer=dict(n_win=4, topk=2, tile_size=32), paro=dict(block_size=32), routing=dict(num_clusters=4, tile_size=32),
    vmoba=dict(block_2d=(2, 2), block_3d=(2, 2, 2), tile_size=32),
    dense=dict(block_size=32), sliding_window=dict(window=40, block_size=32),
    streaming=dict(sink=4, window=40, block_size=32), a_shape=dict(sink=32, window=64, block_size=32))
LENGTH, GRIDS = 256, {2: (16, 16), 3: (4, 8, 8)}
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = methods.training_free()


def make(name):
    return methods.get(name, **SMALL.get(name, {}))


def context(method):
    return dict(grid=GRIDS[method.grid_dims]) if method.needs_grid else {}


def qkv(q_len, k_len, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((4, q_len), (2, k_len), (2, k_len)))
    return q.to(device), k.to(device), v.to(device)


def shapes(method):
    """(q_len, k_len) pairs the method takes: prefill, and chunked prefill / more queries where supported."""
    pairs = [(LENGTH, LENGTH)]
    if method.any_lengths and not method.needs_grid:
        pairs.append((96, LENGTH))
        if method.queries_before_keys:
            pairs.append((LENGTH, 160))
    return pairs


def cases():
    for name in NAMES:
        method = make(name)
        for causal in method.causal_modes:
            for q_len, k_len in shapes(method):
                if causal and q_len > k_len and not method.queries_before_keys:
                    continue
                yield name, causal, q_len, k_len


def is_device_mismatch(error: Exception) -> bool:
    text = str(error).lower()
    return "device" in text and ("expected" in text or "same" in text or "mismatch" in text)


def select(method, q, k, causal):
    """The layout, or None where meta cannot compute (a data-dependent size), never a device mismatch."""
    try:
        return method.select(q, k, causal=causal, **context(method))
    except (RuntimeError, NotImplementedError) as error:
        if q.device.type != "meta":
            raise
        assert not is_device_mismatch(error), f"device mismatch on meta: {error}"
        return None


def check_layout(layout, q, k):
    assert isinstance(layout, BlockLayout)
    assert (layout.q_len, layout.k_len) == (q.shape[2], k.shape[2])
    assert layout.batch in (1, q.shape[0]) and layout.heads in (1, q.shape[1])
    for t in (layout.kv_counts, layout.kv_indices, layout.tile_mask_ids, layout.tile_masks):
        assert t is None or t.device.type == q.device.type


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,causal,q_len,k_len", list(cases()))
def test_layout_is_valid_on_the_inputs_device(name, causal, q_len, k_len, device):
    method = make(name)
    q, k, _ = qkv(q_len, k_len, device)
    layout = select(method, q, k, causal)
    if layout is None:
        return
    check_layout(layout, q, k)
    if device != "meta" and causal:
        assert layout.is_causal()


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "meta"])
@pytest.mark.parametrize("name,causal,q_len,k_len", list(cases()))
def test_sparse_attention_equals_float64_reference(name, causal, q_len, k_len, device):
    method = make(name)
    q, k, v = qkv(q_len, k_len, device, seed=q_len + k_len)
    layout = method.select(q, k, causal=causal, **context(method))
    out = blockattn.sparse_attention(q, k, v, method, context=dict(causal=causal, **context(method)))
    ref = reference_attention(q.double(), k.double(), v.double(), layout.to(q.device))
    assert out.shape == q.shape and out.device == q.device
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_context_and_inputs_are_checked(name):
    method = make(name)
    q, k, _ = qkv(LENGTH, LENGTH, "cpu")
    with pytest.raises(TypeError, match="casual"):
        method.select(q, k, casual=True, **context(method))
    with pytest.raises(TypeError, match="causal"):
        method.select(q, k, causal="yes", **context(method))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        method.select(q.numpy(), k, **context(method))
    with pytest.raises(ValueError, match="4 dims"):
        method.select(q[0], k, **context(method))
    with pytest.raises(ValueError, match="device"):
        method.select(q, k.to("meta"), **context(method))
    with pytest.raises(ValueError, match="multiple of key heads"):
        method.select(q[:, :3], k, **context(method))
    for mode in (True, False):
        if mode not in method.causal_modes:
            with pytest.raises(ValueError, match="encoder-only" if mode else "causal layouts only"):
                method.select(q, k, causal=mode, **context(method))
    if method.grid_dims is None:
        with pytest.raises(ValueError, match="grid"):
            method.select(q, k, grid=(16, 16))
    else:
        with pytest.raises(ValueError, match="grid"):
            method.select(q, k, grid=GRIDS[method.grid_dims][:-1] + (3,))
    if method.needs_grid:
        with pytest.raises(ValueError, match="grid"):
            method.select(q, k)


def _bad_values(field, default):
    """(wrong-type value, wrong value) for a hyperparameter, from its default's type; None where no
    generic bad value exists."""
    if isinstance(default, bool):
        return "yes", None
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return "x", -5
    return None, None


@pytest.mark.parametrize("name", NAMES)
def test_bad_parameters_raise_type_or_value_error(name):
    cls = type(make(name))
    checked = 0
    for field in dataclasses.fields(cls):
        wrong_type, wrong_value = _bad_values(field.name, field.default)
        if wrong_type is not None:
            with pytest.raises(TypeError, match=field.name):
                cls(**{field.name: wrong_type})
            checked += 1
        if wrong_value is not None:
            with pytest.raises(ValueError, match=field.name):
                cls(**{field.name: wrong_value})
    assert checked, f"{name} has no checked hyperparameter"


def test_every_method_declares_its_context():
    for name in NAMES:
        method = make(name)
        assert method.causal_modes and set(method.causal_modes) <= {True, False}
        assert method.grid_dims in (None, 2, 3) and (not method.needs_grid or method.grid_dims)


def test_select_is_final():
    with pytest.raises(TypeError, match="_select"):
        class Bad(methods.Method):
            def select(self, q, k, **ctx):
                return None
