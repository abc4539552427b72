"""The FlexAttention adapter: layouts convert to BlockMask and back, and Flex computes the same attention."""
import pytest
import torch

from blockattn import BlockLayout
from blockattn.ops.flex import flex_attention
from blockattn.ops.reference import reference_attention
from tests.ops.cases import random_case, relative_error


@pytest.mark.parametrize("seed", range(18))
def test_block_mask_round_trip_keeps_token_mask(seed):
    layout = random_case(seed).layout
    back = BlockLayout.from_block_mask(layout.to_block_mask(), allow_empty_rows=True)
    assert torch.equal(back.to_token_mask(), layout.to_token_mask().expand_as(back.to_token_mask()))


@pytest.mark.parametrize("seed", range(12))
def test_eager_flex_matches_reference(seed):
    case = random_case(seed, block_sizes=(16, 32))
    out, lse = flex_attention(case.q, case.k, case.v, case.layout, scale=case.q.shape[-1] ** -0.5, compiled=False)
    ref_out, ref_lse = reference_attention(case.q.double(), case.k.double(), case.v.double(), case.layout,
                                           return_lse=True)
    rows = case.layout.row_has_keys().expand_as(ref_lse)  # Flex's convention for empty rows is its own
    assert relative_error(out[rows], ref_out[rows]) <= 1e-5, case.label
    assert relative_error(lse[rows], ref_lse[rows]) <= 1e-5, case.label


def test_flex_backend_through_attention():
    import blockattn
    case = random_case(3, block_sizes=(16, 32))
    out, lse = blockattn.attention(case.q, case.k, case.v, case.layout, backend="flex", return_lse=True)
    ref_out = reference_attention(case.q.double(), case.k.double(), case.v.double(), case.layout)
    rows = case.layout.row_has_keys().expand_as(lse)
    assert relative_error(out[rows], ref_out[rows]) <= 1e-5
    # torch has no FlexAttention backward on CPU: can_run says so up front, naming the backends that can
    q = case.q.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"no FlexAttention backward on CPU; backends that can: \[.*'cpu'"):
        blockattn.attention(q, case.k, case.v, case.layout, backend="flex")
