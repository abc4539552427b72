"""SeerAttention as a registered method: reachable by name and spec, left out of the default sweeps (it
needs a trained gate file), and keeping the method contract on its own gate fixture."""
import pytest
import torch

import blockattn
from blockattn import methods
from blockattn.modules.seer_gate import SeerAttentionGate, save_gates
from blockattn.ops.reference import reference_attention


@pytest.fixture
def gate_file(tmp_path):
    torch.manual_seed(0)
    gates = {}
    for layer in (0, 3):
        gate = SeerAttentionGate(4, 2, 16, block_size=32, gate_dim=16)
        gate.trained_steps += 1
        gates[layer] = gate
    return save_gates(gates, str(tmp_path / "gates.pt"), model="tiny")


def test_seer_is_registered_but_not_in_the_training_free_sweeps():
    assert "seer" in methods.names()
    assert "seer" not in methods.training_free()
    assert set(methods.training_free()) < set(methods.names())
    with pytest.raises(ValueError, match="gates=PATH"):
        methods.get("seer")


@pytest.mark.parametrize("density", [0.25, 1.0])
def test_seer_keeps_the_method_contract(gate_file, density):
    method = methods.get("seer", gates=gate_file, model="tiny", block_size=32, density=density)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 256, 16, generator=g) for h in (4, 2, 2))
    layout = method.select(q, k, layer=3)
    assert layout.is_causal() and layout.q_len == layout.k_len == 256
    if density == 1.0:
        assert layout.density("causal") == 1.0
    out = blockattn.sparse_attention(q, k, v, method, context=dict(layer=3))
    want = reference_attention(q.double(), k.double(), v.double(), layout).float()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer"):
        method.select(q, k, layer=1)  # no gate trained for that layer
    with pytest.raises(ValueError, match="causal"):
        method.select(q, k, causal=False, layer=3)
    with pytest.raises(TypeError, match="casual"):
        method.select(q, k, casual=True, layer=3)


def test_seer_by_spec_refuses_a_gate_file_for_another_model(gate_file):
    with pytest.raises(ValueError, match="tiny"):
        methods.get("seer", gates=gate_file, block_size=32)  # default model smollm2-135m
    with pytest.raises(TypeError, match="force_diagonal"):
        methods.get("seer", gates=gate_file, model="tiny", block_size=32, force_diagonal="yes")


def test_seer_forces_the_diagonal_only_when_asked(gate_file):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 512, 16, generator=g), torch.randn(1, 2, 512, 16, generator=g)
    official = methods.get("seer", gates=gate_file, model="tiny", block_size=32, density=0.1).select(q, k, layer=0)
    forced = methods.get("seer", gates=gate_file, model="tiny", block_size=32, density=0.1,
                         force_diagonal=True).select(q, k, layer=0)
    eye = torch.eye(16, dtype=torch.bool)
    assert torch.equal(forced.to_dense(), official.to_dense() | eye)
    assert not bool(official.to_dense()[..., eye].all())  # an untrained gate skips some diagonal blocks


def test_seer_inverts_the_models_rope_not_the_gates_block_rope(tmp_path):
    """The gate's block RoPE theta and the model's RoPE theta are different numbers; selection on post-RoPE
    q/k must invert the model's (a gate trained on SmolLM2, theta 100000, read 10000 before this test)."""
    from blockattn.modules.seer_gate import _rope_tables
    torch.manual_seed(4)
    gate = SeerAttentionGate(4, 2, 16, block_size=32, gate_dim=16, rope_theta=1e4, model_rope_theta=1e5)
    gate.trained_steps += 1
    path = save_gates({0: gate}, str(tmp_path / "g.pt"), model="tiny")
    q_nope, k_nope = torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16)
    cos, sin = _rope_tables(256, 16, 1e5, "cpu")
    rot = lambda x: x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin  # noqa: E731
    method = methods.get("seer", gates=path, model="tiny", block_size=32, density=0.25)
    layout = method.select(rot(q_nope), rot(k_nope), layer=0)
    assert torch.equal(layout.to_dense(), gate.select(q_nope, k_nope, density=0.25).to_dense())


def test_model_rope_theta_reads_old_and_new_transformers_configs():
    from types import SimpleNamespace

    from blockattn.modules.seer_gate import model_rope_theta
    assert model_rope_theta(SimpleNamespace(rope_theta=5e5)) == 5e5
    assert model_rope_theta(SimpleNamespace(rope_parameters={"rope_theta": 1e5, "rope_type": "default"})) == 1e5
    with pytest.raises(ValueError, match="plain RoPE"):
        model_rope_theta(SimpleNamespace(rope_parameters={"rope_theta": 1e5, "rope_type": "llama3"}))
    with pytest.raises(ValueError, match="no rope_theta"):
        model_rope_theta(SimpleNamespace())


def test_seer_on_meta_never_fails_on_a_device_mismatch(gate_file):
    """The contract test's meta leg for the one registered method it cannot build from defaults."""
    from tests.methods.test_contract import is_device_mismatch
    method = methods.get("seer", gates=gate_file, model="tiny", block_size=32, density=0.25)
    q, k = torch.randn(2, 4, 256, 16, device="meta"), torch.randn(2, 2, 256, 16, device="meta")
    try:
        layout = method.select(q, k, layer=3)
    except (RuntimeError, NotImplementedError) as error:  # a data-dependent size: meta cannot compute it
        assert not is_device_mismatch(error), error
    else:
        assert layout.q_len == 256
