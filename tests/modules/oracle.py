"""Dense float64 re-computation of a GridAttention module under an explicit token mask."""
import math

from tests.patterns.helpers import masked_attention


def dense_module_output(module, x, mask):
    """x [B, *grid, C]; mask bool [H|1, L, L] in row-major token order."""
    batch, grid, dim = x.shape[0], x.shape[1:-1], x.shape[-1]
    length, heads = math.prod(grid), module.heads
    q, k, v = module.qkv(x.reshape(batch, length, dim)).view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    out = masked_attention(q, k, v, mask[None])
    return module.proj(out.transpose(1, 2).reshape(batch, *grid, dim))
