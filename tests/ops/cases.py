"""Random attention problems covering every feature of a BlockLayout, for exactness tests of any backend."""
from __future__ import annotations

import dataclasses

import torch

import blockattn
from blockattn import BlockLayout

KINDS = ("blocks", "causal", "window", "token_mask", "empty_rows", "per_head_causal")


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: BlockLayout
    label: str


def random_case(seed: int, *, dtype=torch.float32, max_len: int = 200, head_dims=(16, 32, 64, 80),
                block_sizes=(16, 32, 64)) -> Case:
    """One random problem; `seed` picks shapes, layout kind and values deterministically."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    kind = KINDS[seed % len(KINDS)]
    batch, heads_kv, group = pick((1, 2)), pick((1, 2)), pick((1, 2, 3))
    heads_q = heads_kv * group
    q_len = pick((1, int(torch.randint(2, max_len, (1,), generator=g))))
    if q_len == 1 and kind in ("window",):
        q_len = 5
    k_len = pick((q_len, int(torch.randint(max(q_len, 2), max_len + 1, (1,), generator=g)),
                  int(torch.randint(1, max_len, (1,), generator=g))))
    block_q, block_k, dim = pick(block_sizes), pick(block_sizes), pick(head_dims)
    n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
    layout_batch, layout_heads = pick((1, batch)), pick((1, heads_q))
    common = dict(q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k)

    if kind == "blocks":
        blocks = torch.rand(layout_batch, layout_heads, n_q, n_k, generator=g) < 0.5
        blocks[..., int(torch.randint(n_k, (1,), generator=g))] = True
        layout = BlockLayout.from_dense(blocks, **common)
    elif kind in ("causal", "per_head_causal"):
        # random blocks under the causal rule; the diagonal block keeps every row non-empty when k_len >= q_len
        blocks = torch.rand(layout_batch, layout_heads, n_q, n_k, generator=g) < 0.6
        layout = BlockLayout.from_dense(blocks | _diagonal_blocks(**common), causal=True, allow_empty_rows=True,
                                        **common)
    elif kind == "window":
        left, right = int(torch.randint(0, 70, (1,), generator=g)), int(torch.randint(0, 70, (1,), generator=g))
        causal = bool(torch.randint(2, (1,), generator=g))
        blocks = torch.rand(layout_batch, layout_heads, n_q, n_k, generator=g) < 0.8
        layout = BlockLayout.from_dense(blocks, window=(left, right), causal=causal, allow_empty_rows=True, **common)
    elif kind == "token_mask":
        density = float(torch.rand((), generator=g)) * 0.6 + 0.05
        mask = torch.rand(layout_batch, layout_heads, q_len, k_len, generator=g) < density
        # whole blocks dropped too, so some tiles are full, some partial, some absent
        mask[..., : k_len // 3] |= torch.rand(layout_batch, layout_heads, q_len, 1, generator=g) < 0.3
        mask[..., 0] = True
        layout = BlockLayout.from_token_mask(mask, block_q=block_q, block_k=block_k)
    else:  # empty_rows
        blocks = torch.rand(layout_batch, layout_heads, n_q, n_k, generator=g) < 0.3
        layout = BlockLayout.from_dense(blocks, allow_empty_rows=True, **common)

    q = torch.randn(batch, heads_q, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, heads_kv, k_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, heads_kv, k_len, dim, generator=g).to(dtype)
    label = (f"{kind}-B{batch}-H{heads_q}/{heads_kv}-Lq{q_len}-Lk{k_len}-bq{block_q}-bk{block_k}-D{dim}"
             f"-layout{layout.batch}x{layout.heads}")
    return Case(q, k, v, layout, label)


def _diagonal_blocks(q_len, k_len, block_q, block_k):
    rows = torch.arange(q_len) + (k_len - q_len)
    n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
    diag = torch.zeros(n_q, n_k, dtype=torch.bool)
    valid = rows >= 0
    diag[torch.arange(q_len)[valid] // block_q, rows[valid].clamp(max=k_len - 1) // block_k] = True
    return diag


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.1) -> float:
    """max |actual - expected| / max(max |expected|, floor), with -inf entries required to match exactly.

    The floor keeps the measure meaningful where the exact value is ~0 (e.g. dq of a row with a
    single key), where rounding noise of O(eps) would otherwise look like a huge relative error."""
    actual, expected = actual.detach().double(), expected.detach().double()
    infinite = torch.isinf(expected)
    if not torch.equal(torch.isinf(actual), infinite):
        return float("inf")
    if torch.isnan(actual).any():
        return float("nan")
    finite = ~infinite
    if not finite.any():
        return 0.0
    scale = expected[finite].abs().max().clamp(min=floor)
    return float((actual[finite] - expected[finite]).abs().max() / scale)


def check_backend(case: Case, backend: str, *, fwd_tol: float, grad_tol: float, lse_tol: float | None = None,
                  **kwargs) -> None:
    """Compare `backend` with the float64 reference: output, lse and the gradients of q, k, v (through
    both outputs: `lse` is differentiable)."""
    from blockattn.ops.reference import reference_attention

    q, k, v = (t.detach().clone().requires_grad_(True) for t in (case.q, case.k, case.v))
    out, lse = blockattn.attention(q, k, v, case.layout, return_lse=True, backend=backend, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape, case.label
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], case.label
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (case.q, case.k, case.v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, case.layout, return_lse=True, **kwargs)
    err = relative_error(out, ref_out)
    assert err <= fwd_tol, f"{case.label}: output relative error {err:.2e} > {fwd_tol:.0e}"
    err = relative_error(lse, ref_lse)
    assert err <= (lse_tol if lse_tol is not None else fwd_tol), f"{case.label}: lse relative error {err:.2e}"
    # gradients reach q, k, v through out AND lse (rows with no key have no lse gradient to carry)
    grad = torch.randn(out.shape, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, dtype=torch.float64).masked_fill(torch.isinf(ref_lse.detach()), 0.0)
    got = torch.autograd.grad((out, lse), (q, k, v), (grad.to(out.dtype), grad_lse.float()))
    expected = torch.autograd.grad((ref_out, ref_lse), (q64, k64, v64), (grad, grad_lse))
    for name, a, b in zip(("dq", "dk", "dv"), got, expected):
        err = relative_error(a, b)
        assert err <= grad_tol, f"{case.label}: {name} relative error {err:.2e} > {grad_tol:.0e}"


def eager_attention(q, k, v, layout, scale=None):
    """Masked attention in the inputs' own dtype through torch's SDPA with the layout's token mask (what
    a model would run), or, where a row has no key (SDPA's softmax would give NaN), computed the plain
    way (matmuls and softmax in that dtype): the baseline a half-precision kernel's error is held against."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = layout.to_token_mask()
    if bool(mask.any(-1).all()):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: zero output
    return probs @ v


def check_against_eager_error(case: Case, backend: str, *, seed: int, factor: float = 2.0,
                              floor: float = 1e-4) -> None:
    """Half precision: the backend's error against the float64 reference, for the output and the q, k, v
    gradients, is at most `factor` x the error of `eager_attention` in the same dtype on the same inputs
    (`floor`, fp32-rounding level and 40x below a bf16 ulp, absorbs exact zeros that eager bf16 hits
    exactly and an fp32 backward only to rounding, e.g. dq of a row with a single key)."""
    from blockattn.ops.reference import reference_attention

    # the output gradient is drawn from the case's own seed, so a case is the same problem on every run
    grad = torch.randn(case.q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (case.q, case.k, case.v))
    exact = reference_attention(q64, k64, v64, case.layout)
    exact_grads = torch.autograd.grad(exact, (q64, k64, v64), grad)
    results = {}
    for name, fn in (("backend", lambda q, k, v: blockattn.attention(q, k, v, case.layout, backend=backend)),
                     ("eager", lambda q, k, v: eager_attention(q, k, v, case.layout))):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (case.q, case.k, case.v))
        out = fn(q, k, v)
        results[name] = [out, *torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))]
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        mine = relative_error(results["backend"][i], (exact, *exact_grads)[i])
        eager = relative_error(results["eager"][i], (exact, *exact_grads)[i])
        assert mine <= factor * eager + floor, f"{case.label}: {what} error {mine:.2e} > {factor} x eager {eager:.2e}"
