"""Layout-aware context parallelism on torch.distributed: K/V blocks go only to the ranks that need them.

    plan = blockattn.distributed.make_plan(layout, world_size)   # once per layout (cached)
    q_r, k_r, v_r = (blockattn.distributed.shard(t, layout) for t in (q, k, v))
    out_r = blockattn.distributed.attention(q_r, k_r, v_r, layout)
    out = blockattn.distributed.unshard(out_r, layout)            # == blockattn.attention(q, k, v, layout)

Dynamic methods (the layout comes from q and k) run head-parallel instead (Ulysses all-to-all):
`head_parallel_attention(q_r, k_r, v_r, methods.get("xattention"), layout)`.

Importing this package initialises nothing; the caller owns `torch.distributed.init_process_group`.
"""
from blockattn.distributed.api import attention, shard, unshard
from blockattn.distributed.heads import head_parallel_attention
from blockattn.distributed.plan import Plan, make_plan

__all__ = ["Plan", "attention", "head_parallel_attention", "make_plan", "shard", "unshard"]
