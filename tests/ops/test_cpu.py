"""The compiled CPU kernel against the float64 reference on random layouts (forward, lse, gradients)."""
import pytest
import torch

import blockattn
from tests.ops.cases import check_backend, random_case

pytestmark = pytest.mark.skipif(blockattn.backends()["cpu"] != "available",
                                reason=f"cpu kernel not built: {blockattn.backends()['cpu']}")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernel must fill (out, lse, dk, dv) starts as NaN, so an unwritten element fails."""
    from blockattn.ops import cpu

    def nan_buffer(like, shape=None):
        return torch.full(like.shape if shape is None else shape, float("nan"), dtype=torch.float32)

    monkeypatch.setattr(cpu, "_new_buffer", nan_buffer)


def _isas():
    """The forward implementations this CPU can run: "avx2" always, "avx512" where supported."""
    from blockattn.ops import cpu
    if cpu._kernel is None:
        return ["avx2"]
    current, isas = cpu._kernel.isa(), ["avx2"]
    try:
        cpu._kernel.set_isa("avx512")
        isas.append("avx512")
    except RuntimeError:
        pass
    cpu._kernel.set_isa(current)
    return isas


@pytest.fixture(params=_isas())
def isa(request):
    """Runs the test once per forward implementation (AVX-512 micro-kernels, AVX2 + MKL)."""
    from blockattn.ops import cpu
    current = cpu._kernel.isa()
    cpu._kernel.set_isa(request.param)
    yield request.param
    cpu._kernel.set_isa(current)


@pytest.mark.parametrize("seed", range(220))
def test_matches_reference_fp32(seed, isa):
    check_backend(random_case(seed), "cpu", fwd_tol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_half(seed, dtype, isa):
    check_backend(random_case(2000 + seed, dtype=dtype), "cpu", fwd_tol=1e-2, grad_tol=2e-2, lse_tol=1e-2)


@pytest.mark.parametrize("dim", [80, 128, 256])
def test_large_head_dims_and_custom_scale(dim, isa):
    check_backend(random_case(11, head_dims=(dim,)), "cpu", fwd_tol=1e-5, grad_tol=1e-4, scale=0.2)


@pytest.mark.parametrize("seed", range(40))
def test_odd_block_sizes_and_head_dims(seed, isa):
    # query blocks of 48 / 80 / 128 rows: partial 16-lane vectors and several 64-query chunks in the
    # AVX-512 forward; head dims that are not multiples of its 4-row micro-tiles
    case = random_case(5000 + seed, block_sizes=(7, 48, 80, 128), head_dims=(3, 8, 36, 100))
    check_backend(case, "cpu", fwd_tol=1e-5, grad_tol=1e-4)


def test_isa_can_be_forced_to_avx2():
    from blockattn.ops import cpu
    current = cpu.isa()
    cpu._kernel.set_isa("avx2")
    assert cpu.isa() == "avx2"
    cpu._kernel.set_isa(current)
    with pytest.raises(RuntimeError, match="isa must be"):
        cpu._kernel.set_isa("sse")


def test_float64_is_refused_by_name_and_auto_gives_it_to_torch():
    case = random_case(5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"dtype float64 is not supported by the cpu backend.*backends that can: "
                                        r"\['reference', 'torch'"):
        blockattn.attention(case.q, case.k, case.v, case.layout, backend="cpu")
    check_backend(case, "auto", fwd_tol=1e-12, grad_tol=1e-12)


def test_long_rows_span_many_tiles(isa):
    # 1024 keys in 16 tiles per row: exercises the online-softmax rescaling across tiles
    q, k, v = (torch.randn(1, 2, 1024, 64) * 3 for _ in range(3))
    from tests.ops.cases import Case
    layout = blockattn.patterns.random_blocks(1024, density=0.5, heads=2, seed=4)
    check_backend(Case(q, k, v, layout, "long"), "cpu", fwd_tol=1e-5, grad_tol=1e-4)


def test_outputs_are_poisoned_before_the_kernel_runs():
    from blockattn.ops import cpu
    assert torch.isnan(cpu._new_buffer(torch.zeros(2, 3))).all()


def test_empty_rows_give_zero_output_and_minus_inf_lse(isa):
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    blocks = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    blocks[0, 0, 0, 1] = True  # head 0: only the first query block has keys; head 1: nothing at all
    layout = blockattn.BlockLayout.from_dense(blocks, q_len=40, k_len=40, block_q=16, block_k=16,
                                              allow_empty_rows=True)
    out, lse = blockattn.attention(q, k, v, layout, return_lse=True, backend="cpu")
    assert torch.isfinite(lse[0, 0, :16]).all()
    assert torch.equal(out[0, 0, 16:], torch.zeros(24, 16)) and torch.equal(out[0, 1], torch.zeros(40, 16))
    assert torch.isneginf(lse[0, 0, 16:]).all() and torch.isneginf(lse[0, 1]).all()


@pytest.mark.parametrize("bad, message", [
    (dict(k=torch.randn(1, 3, 32, 16), v=torch.randn(1, 3, 32, 16)), "head"),
    (dict(q=torch.randn(1, 2, 32, 16).to(torch.int32)), "float32"),
])
def test_bad_inputs_raise_value_error(bad, message):
    args = dict(q=torch.randn(1, 2, 32, 16), k=torch.randn(1, 2, 32, 16), v=torch.randn(1, 2, 32, 16))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        blockattn.attention(args["q"], args["k"], args["v"], blockattn.patterns.causal(32, block_q=16, block_k=16),
                            backend="cpu")


def test_non_contiguous_inputs(isa):
    # [B, L, H, D] storage seen as [B, H, L, D], as model code produces it
    from tests.ops.cases import Case
    q, k, v = (torch.randn(2, 70, 4, 32).transpose(1, 2) for _ in range(3))
    blocks = torch.rand(1, 4, 3, 5) < 0.5
    blocks[..., 0] = True
    layout = blockattn.BlockLayout.from_dense(blocks, q_len=70, k_len=70, block_q=32, block_k=16, causal=True)
    check_backend(Case(q, k[:, :2], v[:, :2], layout, "strided"), "cpu", fwd_tol=1e-5, grad_tol=1e-4)


def test_isa_switch_errors_are_clear(monkeypatch):
    from blockattn.ops import cpu
    current = cpu.isa()
    q = torch.randn(1, 1, 64, 16)
    layout = blockattn.patterns.causal(64)
    monkeypatch.setenv("BLOCKATTN_CPU_ISA", "sse")
    with pytest.raises(ValueError, match=r"BLOCKATTN_CPU_ISA='sse' is not a CPU path; expected one of"):
        blockattn.attention(q, q, q, layout)
    monkeypatch.setenv("BLOCKATTN_CPU_ISA", "avx2")
    try:
        assert cpu.paths()["fp32"] == "avx2" and cpu.paths()["bf16"].startswith("avx2")
    finally:
        cpu._kernel.set_isa(current)


def test_info_names_the_cpu_and_the_path_per_dtype(capsys):
    from blockattn.cli import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu: " in out and "fp32: avx" in out and "bf16: " in out


@pytest.mark.parametrize("seed", range(200))
def test_bf16_within_twice_the_error_of_eager_bf16(seed):
    # on AVX512-BF16 CPUs this is the native bf16 forward (even head dims and blocks), elsewhere the
    # fp32-converted path; every layout feature of the fp32 generator, outputs poisoned
    from tests.ops.cases import check_against_eager_error
    check_against_eager_error(random_case(7000 + seed, dtype=torch.bfloat16), "cpu", seed=seed)


@pytest.mark.parametrize("seed", range(200))
def test_fp16_within_twice_the_error_of_eager_fp16(seed):
    from tests.ops.cases import check_against_eager_error
    check_against_eager_error(random_case(7500 + seed, dtype=torch.float16), "cpu", seed=seed)


def test_bf16_runs_natively_where_the_cpu_has_avx512_bf16():
    from blockattn.ops import cpu
    q = torch.randn(1, 2, 96, 16, dtype=torch.bfloat16)
    layout = blockattn.patterns.causal(96, block_q=32, block_k=32)
    native = cpu.isa() == "avx512" and cpu._kernel.has_avx512_bf16()
    assert cpu._native_bf16(q, layout) == native
    assert not cpu._native_bf16(q[..., :15], layout)  # odd head dim: pairs do not fit, converted path
