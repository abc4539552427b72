"""GPU benchmark of the Triton backend: one command, prints the engine table on a CUDA GPU.

    python benchmarks/gpu.py                 # on a GPU, < 5 minutes on an H200
    TRITON_INTERPRET=1 python benchmarks/gpu.py --quick   # tiny sizes on the CPU interpreter (plumbing check)

For each layout and length: triton ms, SDPA ms (the FlashAttention backend; `is_causal` for causal
layouts) and ratio, compiled FlexAttention ms (warm; compile seconds separately) and ratio, density
and effective TFLOP/s — forward and forward+backward. A correctness check against SDPA runs first.
Each row catches its own errors so one failure does not lose the table.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

import blockattn
from blockattn import patterns


def timed(fn, device, repeats):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end))
        return best
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best


def sdpa_backend(device):
    """SDPA pinned to FlashAttention on CUDA (an error, not a silent fallback, if Flash cannot run)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def step(fn, backward, inputs, grad):
    def run():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, inputs, grad)
    return run


def methods_on_device(device, dtypes, length=1024):
    """Every LLM-prefill method selects on the device and its layout runs through the engine there,
    against the float64 reference (SmolLM2's 9/3 heads, D=64): a device mismatch or a wrong layout shows
    up here, one line per method."""
    from blockattn import methods
    from blockattn.ops.reference import reference_attention

    for dtype in dtypes:
        torch.manual_seed(0)
        q = torch.randn(1, 9, length, 64, device=device, dtype=dtype)
        k, v = (torch.randn(1, 3, length, 64, device=device, dtype=dtype) for _ in range(2))
        for name in methods.training_free():
            try:
                layout = methods.get(name).select(q, k)
                out = blockattn.attention(q, k, v, layout)
                ref = reference_attention(q, k, v, layout)
                err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
                print(f"# method {name} on {device.type} ({str(dtype)[6:]}): layout on {layout.device.type}, "
                      f"density {layout.density():.3f}, rel. error vs float64 {err:.1e}", flush=True)
            except Exception as error:
                print(f"# method {name} on {device.type}: {type(error).__name__}: {str(error)[:150]}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the CPU interpreter)")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"],
                        choices=["bfloat16", "float16", "float32"], help="each gets the whole table")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads, dim = (2, 32) if args.quick else (args.heads, args.dim)
    block = 64 if args.quick else 128
    lengths = [128, 256] if args.quick else [4096, 8192, 16384, 32768]
    sparse_lengths = [256] if args.quick else [16384, 32768]
    window = 64 if args.quick else 2048
    configs = [("causal", L, lambda L: patterns.causal(L, block_q=block, block_k=block)) for L in lengths]
    configs += [("random-10%", L, lambda L: patterns.random_blocks(L, density=0.1, heads=heads, block_q=block,
                                                                   block_k=block)) for L in sparse_lengths]
    configs += [(f"window-{window}", L, lambda L: patterns.sliding_window(L, window=window, block_q=block,
                                                                          block_k=block)) for L in sparse_lengths]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"# {name}, torch {torch.__version__}, {' '.join(args.dtype)}, B=1, H={heads}, D={dim}, block {block}")

    # correctness first: the full causal layout against SDPA, output and gradients, in both half dtypes
    L = lengths[0]
    for check_dtype in (torch.bfloat16, torch.float16):
        try:
            inputs = [torch.randn(1, heads, L, dim, device=device, dtype=check_dtype, requires_grad=True)
                      for _ in range(3)]
            grad = torch.randn(1, heads, L, dim, device=device, dtype=check_dtype)
            layout = patterns.causal(L, block_q=block, block_k=block).to(device)
            ours = blockattn.attention(*inputs, layout, backend="triton")
            with sdpa_backend(device):
                theirs = F.scaled_dot_product_attention(*inputs, is_causal=True)
            diffs = [(ours - theirs).float().abs().max().item()]
            diffs += [(a - b).float().abs().max().item() for a, b in zip(torch.autograd.grad(ours, inputs, grad),
                                                                         torch.autograd.grad(theirs, inputs, grad))]
            print(f"# check vs SDPA at L={L}, {str(check_dtype)[6:]}: max abs diff out {diffs[0]:.2e}, "
                  f"dq {diffs[1]:.2e}, dk {diffs[2]:.2e}, dv {diffs[3]:.2e}", flush=True)
        except Exception as error:
            print(f"# check vs SDPA at L={L}, {check_dtype}: error {type(error).__name__}: {str(error)[:200]}")

    from blockattn.ops.flex import compiled_flex_attention
    methods_on_device(device, dtypes=[getattr(torch, d) for d in args.dtype][:1])
    print("| dtype | layout | L | mode | triton ms | SDPA ms | vs SDPA | Flex ms (compile s) | vs Flex | density | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(d, c) for d in args.dtype for c in configs]
    for dtype_name, (family, L, build) in rows:
        dtype = getattr(torch, dtype_name)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            try:
                layout = build(L).to(device)
                inputs = [torch.randn(1, heads, L, dim, device=device, dtype=dtype, requires_grad=backward)
                          for _ in range(3)]
                grad = torch.randn(1, heads, L, dim, device=device, dtype=dtype)
                ours = timed(step(lambda q, k, v: blockattn.attention(q, k, v, layout, backend="triton"), backward,
                                  inputs, grad), device, args.repeats)
                with sdpa_backend(device):
                    sdpa = timed(step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=layout.causal),
                                      backward, inputs, grad), device, args.repeats)
                flex_text, vs_flex = "-", "-"
                if device.type == "cuda":
                    # a fresh compile per layout: past dynamo's recompile limit Flex would silently run eagerly
                    torch._dynamo.reset()
                    block_mask = layout.to_block_mask()
                    flex = compiled_flex_attention()
                    call = step(lambda q, k, v: flex(q, k, v, block_mask=block_mask), backward, inputs, grad)
                    start = time.perf_counter()
                    call()
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - start
                    flex_ms = timed(call, device, args.repeats)
                    flex_text, vs_flex = f"{flex_ms:.2f} ({compile_s:.1f})", f"{ours / flex_ms:.2f}"
                pairs = layout.token_density() * L * L * heads
                flops = 4 * dim * pairs * (3.5 if backward else 1.0)
                print(f"| {dtype_name} | {family} | {L} | {mode} | {ours:.2f} | {sdpa:.2f} | {ours / sdpa:.2f} | {flex_text} | "
                      f"{vs_flex} | {layout.density():.3f} | {flops / ours / 1e9:.1f} |", flush=True)
            except Exception as error:  # keep the rest of the table
                print(f"| {dtype_name} | {family} | {L} | {mode} | error: {type(error).__name__}: {str(error)[:120]} |", flush=True)


if __name__ == "__main__":
    main()
