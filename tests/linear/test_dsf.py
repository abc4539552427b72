"""DSF: every materialised Φ reproduces its mixer's own output, y = Φ u, and the paper's unit properties."""
import math

import pytest
import torch

import blockattn
from blockattn.linear import dsf, lightning_attention, taylor_linear_attention
from blockattn.linear.lightning.naive import lightning_attention_naive
from tests.linear._util import rel_err


def _qkv(length=20, dim=8):
    return (torch.randn(2, 2, length, dim, dtype=torch.float64) for _ in range(3))


def test_softmax_rows_are_a_distribution_and_match_the_engine():
    q, k, v = _qkv()
    phi = dsf.mixing_matrix("softmax", q=q, k=k)
    assert (phi >= 0).all() and torch.allclose(phi.sum(-1), torch.ones(2, 2, 20, dtype=torch.float64))
    out = blockattn.attention(q, k, v, blockattn.patterns.causal(20))
    assert rel_err(phi @ v, out) <= 1e-10


def test_linear_attention_recurrent_equals_parallel():
    q, k, v = _qkv()
    phi = dsf.mixing_matrix("linear", q=q, k=k)
    recurrent, _ = lightning_attention_naive(q, k, v, torch.ones(2, dtype=torch.float64))
    assert rel_err(phi @ v, recurrent) <= 1e-10


def test_lightning_matches_blocked_op():
    q, k, v = _qkv()
    decay = torch.tensor([0.9, 0.6], dtype=torch.float64)
    phi = dsf.mixing_matrix("lightning", q=q, k=k, decay=decay)
    assert rel_err(phi @ v, lightning_attention(q, k, v, decay, block_size=8)) <= 1e-10


def test_based_matches_its_op():
    q, k, v = _qkv(40, 4)
    phi = dsf.mixing_matrix("based", q=q, k=k, window=6)
    assert rel_err(phi @ v, blockattn.linear.based(q, k, v, window=6)) <= 1e-8
    assert rel_err(dsf.linear_matrix(q, k, dsf.taylor_feature_map, normalize=True) @ v,
                   taylor_linear_attention(q, k, v)) <= 1e-8


def _scan_ssm(u, delta, A, B, C):
    batch, length, channels = u.shape
    h = torch.zeros(batch, channels, A.shape[1], dtype=u.dtype)
    ys = []
    for i in range(length):
        h = torch.exp(delta[:, i, :, None] * A) * h + delta[:, i, :, None] * B[:, i, None, :] * u[:, i, :, None]
        ys.append((h * C[:, i, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


def test_selective_ssm_matches_its_scan():
    batch, length, channels, n = 2, 16, 3, 4
    u = torch.randn(batch, length, channels, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(batch, length, channels, dtype=torch.float64))
    A = -torch.rand(channels, n, dtype=torch.float64) - 0.1
    B, C = (torch.randn(batch, length, n, dtype=torch.float64) for _ in range(2))
    phi = dsf.mixing_matrix("ssm", delta=delta, A=A, B=B, C=C)
    y = torch.einsum("bcij,bjc->bic", phi, u)
    assert rel_err(y, _scan_ssm(u, delta, A, B, C)) <= 1e-10


def test_constant_decay_ssm_is_geometric():
    length = 10
    lam = 0.7
    delta = torch.ones(1, length, 1, dtype=torch.float64)
    A = torch.full((1, 1), math.log(lam), dtype=torch.float64)
    ones = torch.ones(1, length, 1, dtype=torch.float64)
    phi = dsf.ssm_matrix(delta, A, ones, ones)[0, 0]
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    expected = torch.where(j <= i, lam ** (i - j).double(), torch.zeros((), dtype=torch.float64))
    assert torch.allclose(phi, expected)


def test_rnn_matches_its_recurrence():
    batch, length, channels = 2, 12, 3
    f, g, o = (torch.sigmoid(torch.randn(batch, length, channels, dtype=torch.float64)) for _ in range(3))
    u = torch.randn(batch, length, channels, dtype=torch.float64)
    h, ys = torch.zeros(batch, channels, dtype=torch.float64), []
    for i in range(length):
        h = f[:, i] * h + g[:, i] * u[:, i]
        ys.append(o[:, i] * h)
    phi = dsf.mixing_matrix("rnn", forget=f, input_gate=g, output_gate=o)
    assert rel_err(torch.einsum("bcij,bjc->bic", phi, u), torch.stack(ys, 1)) <= 1e-10


def test_every_matrix_is_causal_and_plots(tmp_path):
    mats = dsf.demo_matrices(length=12)
    assert set(mats) == set(dsf.MIXING_MATRICES)
    for name, phi in mats.items():
        assert phi.shape == (12, 12) and (phi.triu(1) == 0).all(), name
    path = dsf.plot_mixing_matrices(mats, str(tmp_path / "dsf.png"))
    assert (tmp_path / "dsf.png").stat().st_size > 1000 and path.endswith("dsf.png")


def test_unknown_mixer():
    with pytest.raises(ValueError, match="mixer must be one of"):
        dsf.mixing_matrix("mamba2")
