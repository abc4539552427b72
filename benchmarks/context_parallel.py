"""Context parallelism on one machine (gloo): blockattn.distributed beside an all-gather baseline and torch's
own ring attention, on the same layouts in the same run; then a projection to 8/64/512 ranks from the plan.

    nice python benchmarks/context_parallel.py --length 32768 --ranks 2 4

Per layout and rank count it prints the K/V bytes each rank receives (measured on the wire for blockattn,
from the collective's size for the baselines), the forward time (max over ranks, median of --reps) and the
per-rank active tiles (max/mean). The baselines:
- all-gather: every rank all-gathers the whole K/V (what torch's Flex/varlen context parallel and
  Llama-3-style CP do), then runs the same engine over its query rows of the same layout;
- torch ring: `torch.distributed.tensor.experimental._context_parallel._attention._templated_ring_attention`
  (the ring behind `context_parallel`) with torch's CPU SDPA kernel and its head-tail load balance. SDPA
  has no block layout, so the ring computes full causal attention whatever the layout; the public
  `context_parallel` context manager does not dispatch on CPU (its table has the CUDA SDPA ops only).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.multiprocessing as mp

import blockattn
import blockattn.distributed as bd
from blockattn import patterns


def build_layouts(length, window, density, block, names):
    makers = {
        "causal": lambda: patterns.causal(length, block_q=block, block_k=block),
        "sliding": lambda: patterns.sliding_window(length, window=window, block_q=block, block_k=block),
        "random": lambda: patterns.random_blocks(length, density=density, seed=0, block_q=block, block_k=block),
    }
    return {name: makers[name]() for name in names}


class RecvCounter:
    """Bytes this rank receives through point-to-point ops (what blockattn.distributed really moves)."""

    def __init__(self):
        self.bytes, self._original = 0, dist.batch_isend_irecv

    def __enter__(self):
        def counting(ops):
            self.bytes += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.irecv)
            return self._original(ops)
        dist.batch_isend_irecv = counting
        return self

    def __exit__(self, *exc):
        dist.batch_isend_irecv = self._original


def timed(fn, reps):
    times, out = [], None
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return statistics.median(times), out


def all_gather_baseline(layout, plan, rank, world):
    """Every rank gets the whole K/V by one all_gather; the same engine then runs its rows of `layout`."""
    everything = dataclasses.replace(plan, need=torch.ones_like(plan.need), _ranks={})
    rows = everything.rank_plan(rank, layout).sublayout
    longest = max(plan.local_len(r) for r in range(world))
    order = torch.cat([plan.token_index(r) for r in range(world)]).argsort()

    def run(q, k, v):
        kv = torch.nn.functional.pad(torch.stack([k, v]), (0, 0, 0, longest - k.shape[2])).contiguous()
        if kv.requires_grad:
            # differentiable: its backward sums every rank's dK/dV of a shard back onto the owner
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated in 2.13, still the autograd one
                pieces = dist_nn.all_gather(kv)
        else:
            pieces = [torch.empty_like(kv) for _ in range(world)]
            dist.all_gather(pieces, kv)
        full = torch.cat([p[..., :plan.local_len(r), :] for r, p in enumerate(pieces)], dim=3)[..., order, :]
        return blockattn.attention(q, full[0], full[1], rows)
    return run, (world - 1) * longest


def torch_ring(group):
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

    def run(q, k, v):
        # torch's head-tail balance is on by default; the inputs are laid out the way it expects
        return cp._templated_ring_attention(group, 2, op, q, k, v, is_causal=True)[0]
    return run


def head_tail_shard(x, rank, world):
    chunks = x.chunk(2 * world, dim=2)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=2)


def synthetic_cases(args):
    gen = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    layouts = build_layouts(args.length, args.window, args.density, args.block, args.layouts)
    return {name: (layout, q, k, v) for name, layout in layouts.items()}


def xattention_case(args):
    """The XAttention layout of one SmolLM2 layer on real text, with that layer's own q, k, v."""
    from blockattn import methods, models
    from blockattn.bench.capture import capture_qkv, real_text_ids

    model, tokenizer = models.load("smollm2-135m")
    ids = real_text_ids(tokenizer, args.xattention_length)
    q, k, v = capture_qkv(model, ids, layers=[args.xattention_layer])[args.xattention_layer]
    layout = methods.get("xattention").select(q, k, causal=True)
    return {f"xattn-L{args.xattention_layer}": (layout, q.float(), k.float(), v.float())}


def with_backward(fn, grad):
    """Forward + backward of `fn(q, k, v)` with fresh leaves (the training step's attention part)."""
    def run(q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v)
        out.backward(grad)
        return out.detach()
    return run


def worker(rank, world, port, args, cases_path, out_dir):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows, ring_times = [], {}
    for name, (layout, q, k, v) in torch.load(cases_path, weights_only=False).items():
        length, heads, dim = q.shape[2], k.shape[1], k.shape[3]
        per_token = 2 * heads * dim * k.element_size()
        plan = bd.make_plan(layout, world)
        qs, ks, vs = (bd.shard(t, layout, plan=plan) for t in (q, k, v))
        ours = lambda q_, k_, v_: bd.attention(q_, k_, v_, layout, plan=plan)
        gather, gathered_tokens = all_gather_baseline(layout, plan, rank, world)
        if args.backward:
            grad = torch.randn(qs.shape, generator=torch.Generator().manual_seed(rank))
            ours, gather = with_backward(ours, grad), with_backward(gather, grad)
        ours(qs, ks, vs)  # builds the rank's sub-layout once (cached)
        with RecvCounter() as counter:
            t_ours, out = timed(lambda: ours(qs, ks, vs), args.reps)
        recv = torch.tensor([counter.bytes // args.reps], dtype=torch.float64)
        dist.all_reduce(recv, op=dist.ReduceOp.MAX)
        t_gather, out_gather = timed(lambda: gather(qs, ks, vs), args.reps)
        err = torch.tensor([float((out - out_gather).abs().max())])
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        t_heads = heads_bytes = None
        if args.ulysses and k.shape[1] % world == 0:
            # head-parallel with the same (known) layout: what a dynamic method pays instead of the plan
            ulysses = lambda q_, k_, v_: bd.head_parallel_attention(q_, k_, v_, layout, layout, plan=plan)
            if args.backward:
                ulysses = with_backward(ulysses, grad)
            with RecvCounter() as heads_counter:
                t_heads, out_heads = timed(lambda: ulysses(qs, ks, vs), args.reps)
            heads_bytes = torch.tensor([heads_counter.bytes // args.reps], dtype=torch.float64)
            dist.all_reduce(heads_bytes, op=dist.ReduceOp.MAX)
            err = torch.maximum(err, torch.tensor([float((out - out_heads).abs().max())]))
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            heads_bytes = float(heads_bytes)
        key = tuple(q.shape) + tuple(k.shape)
        if key not in ring_times and args.ring and not args.backward:
            ring = torch_ring(dist.group.WORLD)
            group_size = q.shape[1] // k.shape[1]  # the CPU SDPA kernel has no GQA: repeat K/V heads
            qr, kr, vr = (head_tail_shard(t, rank, world) for t in
                          (q, k.repeat_interleave(group_size, 1), v.repeat_interleave(group_size, 1)))
            ring_times[key], _ = timed(lambda: ring(qr, kr, vr), args.reps)
        tiles = plan.tiles.double()
        rows.append(dict(layout=name, length=length, world=world, balance=plan.balance, ours_s=t_ours,
                         gather_s=t_gather, ring_s=ring_times.get(key), ours_recv=float(recv),
                         gather_recv=gathered_tokens * per_token * (2 if args.backward else 1), ring_recv=(world - 1) * (length // world) * per_token,
                         tiles_max_mean=float(tiles.max() / tiles.mean()), tiles=plan.tiles.tolist(),
                         max_err_vs_gather=float(err), ulysses_s=t_heads, ulysses_recv=heads_bytes))
    if rank == 0:
        torch.save(rows, os.path.join(out_dir, "rows.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def projection(args, bandwidth):
    """Per-rank K/V bytes and tile balance from the plan alone (no processes), at --project-length."""
    length, block = args.project_length, args.project_block
    per_token = 2 * args.heads * args.dim * 2  # bf16 K and V, the dtype a real run would use
    print(f"\nprojection from the plan: L={length}, block {block}, {args.heads} KV heads x {args.dim}, bf16 K+V "
          f"({per_token} B/token); comm time = max bytes received per rank / {bandwidth / 1e9:.0f} GB/s per rank, "
          f"no overlap, no contention")
    print(f"{'layout':8} {'P':>4} {'split':>15} {'ours MB/rank':>12} {'all-gather MB':>13} {'ring MB':>8} "
          f"{'ours ms':>8} {'ring ms':>8} {'tiles max/mean':>14}")
    layouts = build_layouts(length, args.window, args.density, block, args.layouts)
    for P in args.project_ranks:
        for name, layout in layouts.items():
            plan = bd.make_plan(layout, P)
            ours = float(plan.recv_tokens().max()) * per_token
            ring = (P - 1) * (length / P) * per_token
            tiles = plan.tiles.double()
            print(f"{name:8} {P:4d} {plan.balance:>15} {ours / 1e6:12.1f} {ring / 1e6:13.1f} {ring / 1e6:8.1f} "
                  f"{ours / bandwidth * 1e3:8.2f} {ring / bandwidth * 1e3:8.2f} {float(tiles.max() / tiles.mean()):14.3f}")


def hf_worker(rank, world, port, args, out_dir):
    """A real model's prefill sharded over `world` ranks against the same model in one process."""
    from blockattn import models
    from blockattn.distributed import hf as cp_hf

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, _ = models.load(args.hf, attn_implementation="blockattn")
    L = args.hf_length
    ids = torch.randint(0, model.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
    layout = patterns.causal(L, block_q=args.block, block_k=args.block)
    with torch.no_grad():
        start = time.perf_counter()
        # every rank runs the one-process answer at the same time (the same work, not a second result)
        reference = model(ids, use_cache=False).logits
        t_single = time.perf_counter() - start
        reference = reference[:, bd.make_plan(layout, world).token_index(rank)]
        dist.barrier()
        start = time.perf_counter()
        with cp_hf.sharded(model, layout):
            local = model(bd.shard(ids, layout, dim=1), position_ids=bd.shard(torch.arange(L)[None], layout, dim=1),
                          use_cache=False).logits
        t_sharded = time.perf_counter() - start
    stats = torch.tensor([float((local - reference).abs().max()), float(reference.abs().max()), t_single, t_sharded],
                         dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save(stats.tolist(), os.path.join(out_dir, "hf.pt"))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layouts", nargs="*", default=["causal", "sliding", "random"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--no-ring", dest="ring", action="store_false")
    parser.add_argument("--ulysses", action="store_true",
                        help="also head-parallel (Ulysses all-to-all) with the same layout, when KV heads divide P")
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (ours and all-gather; the ring is forward only)")
    parser.add_argument("--xattention", action="store_true", help="add an XAttention layout from SmolLM2")
    parser.add_argument("--xattention-length", type=int, default=8192)
    parser.add_argument("--xattention-layer", type=int, default=15)
    parser.add_argument("--project-length", type=int, default=131072)
    parser.add_argument("--project-block", type=int, default=128)
    parser.add_argument("--project-ranks", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--bandwidth-gbs", type=float, default=50.0, help="per-rank link, GB/s (projection)")
    parser.add_argument("--no-run", dest="run", action="store_false", help="projection only")
    parser.add_argument("--hf", default=None, help="also a real model's sharded prefill, e.g. smollm2-135m")
    parser.add_argument("--hf-length", type=int, default=8192)
    parser.add_argument("--hf-ranks", type=int, default=2)
    args = parser.parse_args()

    if args.hf:
        with tempfile.TemporaryDirectory() as out_dir:
            mp.start_processes(hf_worker, args=(args.hf_ranks, free_port(), args, out_dir), nprocs=args.hf_ranks,
                               start_method="spawn")
            diff, scale, t_single, t_sharded = torch.load(os.path.join(out_dir, "hf.pt"))
        print(f"{args.hf} prefill of {args.hf_length} tokens on {args.hf_ranks} ranks (causal, head-tail shards, "
              f"position ids per shard): max |logits - one process| = {diff:.3e}, relative to max |logits| "
              f"{diff / scale:.2e}; one process {t_single:.1f} s, sharded {t_sharded:.1f} s (each rank "
              f"{args.threads} thread(s); the one-process runs overlap on the same cores)")

    if args.run:
        cases = synthetic_cases(args)
        if args.xattention:
            cases.update(xattention_case(args))
        print(f"synthetic: L={args.length}, {args.heads} heads (MHA) x {args.dim}, fp32, block {args.block}, window "
              f"{args.window}, random density {args.density}; xattn: SmolLM2 layer {args.xattention_layer} q/k/v "
              f"(9 q / 3 kv heads x 64) on {args.xattention_length} tokens of text, XAttention's default layout; "
              f"gloo on 127.0.0.1, {args.threads} thread(s) per rank, "
              f"{'forward + backward' if args.backward else 'forward'}, median of {args.reps}; ours MB counts "
              f"{'both directions received' if args.backward else 'K/V received'}")
        print(f"{'layout':10} {'L':>6} {'P':>2} {'split':>15} {'ours MB':>8} {'gather MB':>9} {'ring MB':>8} "
              f"{'ours s':>7} {'gather s':>8} {'ring s':>7} {'ours/ring':>9} {'tiles max/mean':>14} {'err':>8}")
        for world in args.ranks:
            with tempfile.TemporaryDirectory() as out_dir:
                cases_path = os.path.join(out_dir, "cases.pt")
                torch.save(cases, cases_path)
                mp.start_processes(worker, args=(world, free_port(), args, cases_path, out_dir), nprocs=world,
                                   start_method="spawn")
                rows = torch.load(os.path.join(out_dir, "rows.pt"))
            for r in rows:
                ring = f"{r['ring_s']:7.3f}" if r["ring_s"] is not None else "      -"
                ratio = f"{r['ours_s'] / r['ring_s']:9.2f}" if r["ring_s"] else "        -"
                print(f"{r['layout']:10} {r['length']:6d} {r['world']:2d} {r['balance']:>15} {r['ours_recv'] / 1e6:8.2f} "
                      f"{r['gather_recv'] / 1e6:9.2f} {r['ring_recv'] / 1e6:8.2f} {r['ours_s']:7.3f} "
                      f"{r['gather_s']:8.3f} {ring} {ratio} {r['tiles_max_mean']:14.3f} {r['max_err_vs_gather']:8.1e}"
                      + (f"  ulysses {r['ulysses_recv'] / 1e6:.2f} MB {r['ulysses_s']:.3f} s" if r["ulysses_s"] else ""))
    projection(args, args.bandwidth_gbs * 1e9)


if __name__ == "__main__":
    main()
