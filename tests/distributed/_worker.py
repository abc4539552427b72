"""One spawned rank of the distributed tests: runs every case on a real gloo group and saves its results.

Every case runs on every rank in the same order (the group stays in step); a case that fails on one rank
records the failure instead of raising, and the parent test asserts on the saved numbers.
"""
from __future__ import annotations

import os
import time
import traceback
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

import blockattn
import blockattn.distributed as bd
from blockattn import BlockLayout, patterns

BLOCK = 16


def _docs_mask(L):
    # documents whose edges fall inside blocks, causal inside each, plus every third key: explicit tile masks
    doc = torch.zeros(L, dtype=torch.long)
    for edge in (90, 200):
        doc[edge:] += 1

    def mask_mod(b, h, q, k):
        return (doc[q] == doc[k]) & (k <= q) & (((q - k) % 3 == 0) | (q - k < 8))
    return BlockLayout.from_token_mask(mask_mod, q_len=L, k_len=L, block_q=BLOCK, block_k=BLOCK)


def layouts():
    """name -> (layout, batch, q heads, kv heads, head dim, extra facts for the traffic checks)."""
    p = dict(block_q=BLOCK, block_k=BLOCK)
    return {
        "causal": (patterns.causal(256, **p), 1, 2, 2, 16, {}),
        "causal_odd_gqa": (patterns.causal(250, **p), 1, 4, 2, 16, {}),
        "sliding": (patterns.sliding_window(256, window=32, **p), 1, 2, 2, 16, {"halo": 32}),
        "sliding_two_sided": (patterns.sliding_window(256, window=16, causal=False, **p), 1, 2, 2, 16,
                              {"halo": 32}),
        "random": (patterns.random_blocks(256, density=0.25, heads=2, seed=3, **p), 1, 2, 1, 16, {}),
        "per_head_mqa": (patterns.per_head([patterns.causal(256, **p), patterns.sliding_window(256, window=40, **p),
                                            patterns.random_blocks(256, density=0.3, seed=1, **p)]), 1, 3, 1, 16, {}),
        "tile_masks_batch2": (_docs_mask(256), 2, 2, 2, 8, {}),
        "gqa_batch2": (patterns.causal(192, **p), 2, 4, 1, 16, {}),
    }


class _Counter:
    """Counts the bytes this rank receives through point-to-point ops (what really crosses the wire)."""

    def __init__(self):
        self.recv_bytes, self.recv_msgs = 0, []
        self._original = dist.batch_isend_irecv

    def __enter__(self):
        def counting(ops):
            for op in ops:
                if op.op is dist.irecv:
                    self.recv_bytes += op.tensor.numel() * op.tensor.element_size()
                    self.recv_msgs.append(op.peer)
            return self._original(ops)
        dist.batch_isend_irecv = counting
        return self

    def __exit__(self, *exc):
        dist.batch_isend_irecv = self._original


def _err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


def check_layout(name, rank, world, group):
    layout, B, Hq, Hkv, D, extra = layouts()[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    L = layout.q_len
    q = torch.randn(B, Hq, L, D, generator=gen)
    k = torch.randn(B, Hkv, L, D, generator=gen)
    v = torch.randn(B, Hkv, L, D, generator=gen)
    grad_out = torch.randn(B, Hq, L, D, generator=gen)
    # the single-process answer
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    out_f, lse_f = blockattn.attention(qf, kf, vf, layout, return_lse=True)
    out_f.backward(grad_out)

    plan = bd.make_plan(layout, world)
    qs, ks, vs = (bd.shard(t, layout, group).requires_grad_() for t in (q, k, v))
    with _Counter() as counter:
        out, lse = bd.attention(qs, ks, vs, layout, group=group, return_lse=True)
        fwd_bytes = counter.recv_bytes
        out.backward(bd.shard(grad_out, layout, group))
    full_out = bd.unshard(out.detach(), layout, group)
    tokens = plan.token_index(rank)

    # a naive twin of the need matrix: the key tokens this rank's queries attend, from the token mask
    mask = layout.to_token_mask().any(dim=(0, 1))[tokens]  # [L_r, L]
    needed_keys = mask.any(0)
    needed_blocks = set((needed_keys.nonzero().flatten() // BLOCK).tolist())
    owner_of_token = plan.owner.repeat_interleave(BLOCK)[:L]
    foreign_blocks = {b for b in needed_blocks if int(plan.owner[b]) != rank}
    received_blocks = {int(b) for blocks in plan.recv_blocks(rank).values() for b in blocks}
    shards_touched = {int(owner_of_token[j]) for j in needed_keys.nonzero().flatten()} - {rank}
    bytes_per_token = 2 * B * Hkv * D * 4
    shard_bytes = sum(plan.local_len(s) for s in shards_touched) * bytes_per_token
    local_tiles = int(layout.kv_counts[:, :, plan.blocks[rank]].sum())
    return dict(
        out=_err(out, out_f[:, :, tokens]), lse=_err(lse, lse_f[:, :, tokens]), unshard=_err(full_out, out_f),
        dq=_err(qs.grad, qf.grad[:, :, tokens]), dk=_err(ks.grad, kf.grad[:, :, tokens]),
        dv=_err(vs.grad, vf.grad[:, :, tokens]),
        fwd_bytes=fwd_bytes, total_recv_bytes=counter.recv_bytes,
        plan_bytes=int(plan.recv_tokens()[rank]) * bytes_per_token, bytes_per_token=bytes_per_token,
        halo_bytes=extra.get("halo", 0) * bytes_per_token, shard_bytes=shard_bytes,
        received_equals_needed=received_blocks == foreign_blocks, recv_from=sorted(plan.recv_blocks(rank)),
        shards_touched=sorted(shards_touched), tiles=plan.tiles.tolist(), local_tiles=local_tiles,
        balance=plan.balance)


def check_hf(rank, world, group):
    """A tiny random Llama's prefill sharded over the group gives the single-process logits."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as missing:  # the optional `hf` extra
        return dict(skip=str(missing))
    from blockattn.distributed import hf as cp_hf

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    L = 250
    ids = torch.randint(0, 101, (1, L), generator=torch.Generator().manual_seed(1))
    layout = patterns.causal(L, block_q=BLOCK, block_k=BLOCK)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        with cp_hf.sharded(model, layout, group):
            local = model(bd.shard(ids, layout, group, dim=1), use_cache=False,
                          position_ids=bd.shard(torch.arange(L)[None], layout, group, dim=1)).logits
        logits = bd.unshard(local, layout, group, dim=1)
    return dict(rel=float((logits - reference).abs().max() / reference.abs().max()),
                restored=model.config._attn_implementation)


def check_head_parallel(rank, world, group):
    """A dynamic method (MoBA, per-head top-k from q and k) head-parallel over the group equals one process."""
    from blockattn import methods

    gen = torch.Generator().manual_seed(7)
    L, B, Hq, Hkv, D = 256, 1, 8, 4, 16
    q, k, v = torch.randn(B, Hq, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen), \
        torch.randn(B, Hkv, L, D, generator=gen)
    grad_out = torch.randn(B, Hq, L, D, generator=gen)
    method = methods.get("moba", block_size=32, top_k=2, tile_size=BLOCK)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    out_f, lse_f = blockattn.sparse_attention(qf, kf, vf, method, return_lse=True)
    out_f.backward(grad_out)
    sharding = patterns.causal(L, block_q=BLOCK, block_k=BLOCK)
    tokens = bd.make_plan(sharding, world).token_index(rank)
    qs, ks, vs = (bd.shard(t, sharding, group).requires_grad_() for t in (q, k, v))
    out, lse = bd.head_parallel_attention(qs, ks, vs, method, sharding, group=group, return_lse=True)
    out.backward(bd.shard(grad_out, sharding, group))
    refused = _expect_error(lambda: bd.head_parallel_attention(qs, ks[:, :3], vs[:, :3], method, sharding,
                                                               group=group))
    return dict(out=_err(out, out_f[:, :, tokens]), lse=_err(lse, lse_f[:, :, tokens]),
                dq=_err(qs.grad, qf.grad[:, :, tokens]), dk=_err(ks.grad, kf.grad[:, :, tokens]),
                dv=_err(vs.grad, vf.grad[:, :, tokens]), refused=refused)


def _expect_error(fn):
    try:
        fn()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_bad_inputs(rank, world, group):
    layout = patterns.causal(256, block_q=BLOCK, block_k=BLOCK)
    other = patterns.sliding_window(256, window=32, block_q=BLOCK, block_k=BLOCK)
    longer = patterns.causal(272, block_q=BLOCK, block_k=BLOCK)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=gen) for _ in range(3))
    qs, ks, vs = (bd.shard(t, layout, group) for t in (q, k, v))
    last = world - 1
    g = dict(group=group)
    cases = {
        "short_shard_on_one_rank": lambda: bd.attention(
            *((t[:, :, :-1] if rank == last else t) for t in (qs, ks, vs)), layout, **g),
        "one_token_moved_between_ranks": lambda: bd.attention(
            *((t[:, :, :-1] if rank == last else torch.cat([t, t[:, :, :1]], 2) if rank == 0 else t)
              for t in (qs, ks, vs)), layout, **g),
        "k_longer_than_q_on_rank0": lambda: bd.attention(
            qs, *(torch.cat([t, t[:, :, :BLOCK]], 2) if rank == 0 else t for t in (ks, vs)), layout, **g),
        "layout_longer_than_shards": lambda: bd.attention(qs, ks, vs, longer, **g),
        "plan_for_another_group_size": lambda: bd.attention(qs, ks, vs, layout, plan=bd.make_plan(layout, world + 1),
                                                            **g),
        "layouts_differ_between_ranks": lambda: bd.attention(qs, ks, vs, other if rank == 0 else layout, **g),
        "head_dim_differs_on_one_rank": lambda: bd.attention(
            *((t[..., :8] if rank == last else t) for t in (qs, ks, vs)), layout, **g),
        "q_not_a_tensor_on_one_rank": lambda: bd.attention(qs.tolist() if rank == last else qs, ks, vs, layout, **g),
        "too_many_ranks_for_the_layout": lambda: bd.attention(
            qs, ks, vs, patterns.causal(16 * (world - 1), block_q=BLOCK, block_k=BLOCK), **g),
    }
    results = {name: _expect_error(fn) for name, fn in cases.items()}
    # the group is still in step after every refused call
    out = bd.attention(qs, ks, vs, layout, **g)
    results["after"] = _err(bd.unshard(out, layout, group), blockattn.attention(q, k, v, layout))
    return results


def _poison():
    # uninitialised buffers made by blockattn are NaN, so a gathered row left unwritten shows up
    import sys

    def poisoning(original):
        def poisoned(*args, **kwargs):
            out = original(*args, **kwargs)
            if sys._getframe(1).f_globals.get("__name__", "").startswith("blockattn") and out.is_floating_point():
                out.fill_(float("nan"))
            return out
        return poisoned
    torch.empty, torch.empty_like = poisoning(torch.empty), poisoning(torch.empty_like)
    torch.Tensor.new_empty = poisoning(torch.Tensor.new_empty)


def run(rank, world, port, out_dir):
    """Rank `rank` of `world` processes: every case on a subgroup of each size in `sizes()` (the smaller
    groups are the first ranks; the others wait), so one spawn serves every rank count."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _poison()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results, seconds = {}, {"start": time.time()}
    for size in sizes(world):
        # every rank takes part in creating every group (a collective), only members use it
        group = None if size == world else dist.new_group(list(range(size)))
        if rank < size:
            mine = results[size] = {}
            for name in layouts():
                try:
                    mine[name] = check_layout(name, rank, size, group)
                except Exception:
                    mine[name] = {"error": traceback.format_exc()}
                seconds[f"{size}:{name}"] = time.time()
            for name, check in (("bad_inputs", check_bad_inputs), ("head_parallel", check_head_parallel),
                                ("hf", check_hf)):
                if name == "hf" and size != 2:
                    continue
                try:
                    mine[name] = check(rank, size, group)
                except Exception:
                    mine[name] = {"error": traceback.format_exc()}
                seconds[f"{size}:{name}"] = time.time()
        dist.barrier()
    results["seconds"] = seconds
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def sizes(world):
    return [s for s in (2, 4) if s <= world]
