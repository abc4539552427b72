"""Run under TRITON_INTERPRET=1 (set by test_triton.py): Triton Lightning vs the float64 recurrence."""
import torch

from blockattn.linear import lightning_attention
from blockattn.linear.lightning.naive import lightning_attention_naive
from tests.linear._util import grads, rel_err

torch.manual_seed(0)
for length, dk, dv, block in [(40, 16, 16, 16), (64, 16, 32, 32), (5, 32, 16, 16)]:
    q, k = (torch.randn(2, 2, length, dk) * 0.5 for _ in range(2))
    v = torch.randn(2, 2, length, dv)
    decay = torch.tensor([1.0, 0.8])
    s0 = torch.randn(2, 2, dk, dv)
    out, state = lightning_attention(q, k, v, decay, block_size=block, initial_state=s0, output_final_state=True,
                                     backend="triton")
    ref, ref_state = lightning_attention_naive(q.double(), k.double(), v.double(), decay.double(), s0.double())
    assert rel_err(out, ref) <= 1e-4, (length, rel_err(out, ref))
    assert rel_err(state, ref_state) <= 1e-4
    probe = torch.randn_like(v)
    fast = grads(lambda *t: lightning_attention(*t, decay, block_size=block, backend="triton"), (q, k, v), probe)
    slow = grads(lambda *t: lightning_attention_naive(*t, decay.double())[0], [t.double() for t in (q, k, v)],
                 probe.double())
    for a, b in zip(fast, slow):
        assert rel_err(a, b) <= 1e-4
print("ok triton lightning")
