"""GPU benchmark: the Triton block-causal kernel vs SDPA with a dense mask vs flex attention.

    python -m d2f_kernels.bench_block_attention                   # LLaDA-8B and Dream-7B head shapes
    python -m d2f_kernels.bench_block_attention --models llada --windows 32,64 --caches 1024 --json out.json

The workload is one D2F decoding step of one layer: a window of W query rows (in-flight blocks)
at buffer indices [C, C + W) attending to C cached rows plus the window, block-causally. The
cache holds the prompt (first half, block-aligned) and finished answer blocks. Head shapes:
LLaDA-8B 32 query / 32 kv heads, Dream-7B 28 / 4 (GQA), head_dim 128.

Per shape it reports the median time over CUDA-event-timed repetitions (after warm-up, which
includes flex attention's compilation; L2 is not flushed, as in a real decode loop where the
previous layer just ran), the *useful* TFLOP/s (4 * D flops per visible query-key pair) and GB/s
(q, out, and the k/v rows the window may see, each read or written once), each also as a
percentage of this device's measured ceilings: a large bf16 matmul and a large device copy.
SDPA gets its dense mask prebuilt (the model builds it once per forward and reuses it in every
layer); flex gets its BlockMask prebuilt likewise. "err" is the kernel's max |difference| from SDPA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from d2f import masks

MODELS = {"llada": ("LLaDA-8B", 32, 32, 128), "dream": ("Dream-7B", 28, 4, 128)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_time_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() over `reps` runs, each timed by its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(dtype: torch.dtype, warmup: int, reps: int) -> dict:
    """Achievable peak matmul TFLOP/s and copy GB/s on this device (our denominators)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_time_ms(lambda: a @ b, warmup, reps)
    tflops = 2 * n ** 3 / (ms * 1e-3) / 1e12
    del a, b
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")  # 1 GiB, far beyond L2
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup, reps)
    gbps = 2 * src.numel() / (ms * 1e-3) / 1e9  # read + write
    del src, dst
    return {"matmul_tflops": tflops, "copy_gbps": gbps}


def decode_step(cache_len: int, window: int, block_size: int) -> tuple[int, int]:
    """(prompt_len, block_size) of a step whose window starts on a block boundary at cache_len."""
    bs = min(block_size, window)
    prompt_len = cache_len - bs * ((cache_len // 2) // bs)  # first half prompt, rest finished blocks
    return prompt_len, bs


def bench_shape(heads: int, kv_heads: int, head_dim: int, window: int, cache_len: int, args, flex_fn,
                device="cuda", timer=cuda_time_ms) -> dict:
    """One row of the table. `device` / `timer` are swapped only by the CPU smoke test."""
    from d2f_kernels.block_attention import block_causal_attention

    B, dtype = args.batch, DTYPES[args.dtype]
    S = cache_len + window
    prompt_len, bs = decode_step(cache_len, window, args.block_size)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, heads, window, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, kv_heads, S, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, kv_heads, S, head_dim, device=device, dtype=dtype, generator=g)
    pattern = masks.block_causal(prompt_len, bs)
    q_idx = torch.arange(cache_len, S, device=device)
    mask = pattern.dense(q_idx, torch.arange(S, device=device))  # (1, 1, W, S)
    gqa = heads != kv_heads

    def triton_fn():
        return block_causal_attention(q, k, v, kind="block_causal", prompt_len=prompt_len, block_size=bs,
                                      q_offset=cache_len)

    def sdpa_fn():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    want = sdpa_fn().float()
    row = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "window": window, "cache": cache_len,
           "prompt_len": prompt_len, "block_size": bs, "batch": B, "dtype": args.dtype,
           "err": (triton_fn().float() - want).abs().max().item()}
    row["triton_ms"] = timer(triton_fn, args.warmup, args.reps)
    row["sdpa_ms"] = timer(sdpa_fn, args.warmup, args.reps)
    if flex_fn is not None:
        block_mask = masks.flex_block_mask(pattern, window, S, q_offset=cache_len).to(device)

        def flex():
            return flex_fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)

        row["flex_err"] = (flex().float() - want).abs().max().item()
        row["flex_ms"] = timer(flex, args.warmup, args.reps)

    visible = int(mask.sum())  # query-key pairs the pattern allows (per sample and head)
    flops = 4 * head_dim * visible * B * heads
    elem = q.element_size()
    nbytes = elem * B * head_dim * (2 * heads * window + 2 * kv_heads * S)
    row["tflops"] = flops / (row["triton_ms"] * 1e-3) / 1e12
    row["gbps"] = nbytes / (row["triton_ms"] * 1e-3) / 1e9
    return row


def markdown(rows: list[dict], ceilings: dict, has_flex: bool) -> str:
    head = ["model", "W", "cache", "triton ms", "sdpa ms"] + (["flex ms"] if has_flex else []) + \
        ["x sdpa"] + (["x flex"] if has_flex else []) + ["TFLOP/s", "% peak", "GB/s", "% BW", "err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["window"], r["cache"], f"{r['triton_ms']:.4f}", f"{r['sdpa_ms']:.4f}"]
        if has_flex:
            cells.append(f"{r['flex_ms']:.4f}")
        cells.append(f"{r['sdpa_ms'] / r['triton_ms']:.2f}")
        if has_flex:
            cells.append(f"{r['flex_ms'] / r['triton_ms']:.2f}")
        cells += [f"{r['tflops']:.1f}", f"{100 * r['tflops'] / ceilings['matmul_tflops']:.0f}%",
                  f"{r['gbps']:.0f}", f"{100 * r['gbps'] / ceilings['copy_gbps']:.0f}%", f"{r['err']:.1e}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llada,dream", help=f"comma-separated, from {list(MODELS)}")
    ap.add_argument("--windows", type=parse_ints, default=[16, 32, 64, 128, 256])
    ap.add_argument("--caches", type=parse_ints, default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-flex", action="store_true", help="skip flex attention (its compile takes a while)")
    ap.add_argument("--json", help="also write the rows and ceilings to this file")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_block_attention needs a CUDA GPU (torch.cuda.is_available() is False); "
              "on a CPU, check correctness with `pytest tests/d2f_kernels` instead.", file=sys.stderr)
        return 2
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    flex_fn = None
    if not args.no_flex:
        try:
            import torch._dynamo as dynamo
            from torch.nn.attention.flex_attention import flex_attention
            # one compiled graph per (window, cache) shape: lift the recompile limit (name varies by version)
            for limit in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo.config, limit):
                    setattr(dynamo.config, limit, 1024)
            flex_fn = torch.compile(flex_attention, dynamic=False)
        except ImportError as e:
            print(f"flex attention unavailable ({e}); benchmarking triton vs sdpa only", file=sys.stderr)

    ceilings = measure_ceilings(DTYPES[args.dtype] if args.dtype != "fp32" else torch.bfloat16,
                                args.warmup, args.reps)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; ceilings: {ceilings['matmul_tflops']:.0f} TFLOP/s (8192^3 matmul), "
          f"{ceilings['copy_gbps']:.0f} GB/s (1 GiB copy)\n")
    rows = []
    for m in models:
        name, heads, kv_heads, head_dim = MODELS[m]
        for cache_len in args.caches:
            for window in args.windows:
                row = bench_shape(heads, kv_heads, head_dim, window, cache_len, args, flex_fn)
                rows.append({"model": name, **row})
                print(f"{name} W={window} cache={cache_len}: triton {row['triton_ms']:.4f} ms, "
                      f"sdpa {row['sdpa_ms']:.4f} ms" + (f", flex {row['flex_ms']:.4f} ms" if flex_fn else ""),
                      file=sys.stderr)
    print(markdown(rows, ceilings, flex_fn is not None))
    if args.json:
        import triton
        meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "ceilings": ceilings, "rows": rows}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    from d2f.errors import run_main
    raise SystemExit(run_main(main))
