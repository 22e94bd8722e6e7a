"""Per-kernel GPU time of forward+backward (torch.profiler), ours beside compiled FlexAttention, to see
which kernel loses where.

Usage: python benchmarks/profile_triton.py [--shapes 64x512,128x2048] [--causal 0|1]
[--impls triton,triton-split,flex]
(head dim x seqlen; bf16, the benchmark grid's batch and heads; the implementations are bench_attention's).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import flex_fn, ours_fn  # noqa: E402

from flexattn_ops import triton_backend  # noqa: E402

_fusable = triton_backend._fusable


def impl_fn(impl: str, causal: bool, s: int):
    """bench_attention's function for `impl`; "triton-split" is the Triton backend with its backward in two
    launches (dK/dV, then dQ) instead of the tuned choice, for an A/B."""
    triton_backend._fusable = _fusable if impl != "triton-split" else lambda *args: False
    return flex_fn(causal, s) if impl == "flex" else ours_fn(causal, impl.replace("-split", ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="64x512,128x512,128x2048")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--impls", default="triton,flex")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    for spec in args.shapes.split(","):
        d, s = (int(x) for x in spec.split("x"))
        h, b = 2048 // d, max(1, 16384 // s)
        causal = bool(args.causal)
        # (b, h, s, d), as bench_attention passes them
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        flops = 3.5 * 2 * b * h * s * s * 2 * d / (2 if causal else 1)
        for impl in args.impls.split(","):
            fn = impl_fn(impl, causal, s)
            g = torch.randn_like(fn(q, k, v))  # ours returns (b, s, h, d), Flex (b, h, s, d)

            def step(fn=fn, q=q, k=k, v=v, g=g):
                fn(q, k, v).backward(g)

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_time_total > 0]
            total_us = sum(e.self_device_time_total for e in events) / 10
            print(
                f"== {impl} d={d} s={s} b={b} h={h} causal={int(causal)}: {total_us:.0f} us GPU per step, "
                f"{flops / total_us / 1e6:.0f} TFLOP/s of GPU time"
            )
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:6]:
                print(f"   {e.self_device_time_total / 10:9.1f} us  x{e.count // 10:<3d} {e.key[:90]}")
            # the last step's kernels in launch order: tells apart launches of one kernel (dK/dV, then dQ)
            kernels = sorted((e for e in prof.events() if e.device_time_total > 0), key=lambda e: e.time_range.start)
            last = kernels[-len(kernels) // 10 :]
            print("   last step: " + ", ".join(f"{e.name[:24]} {e.device_time_total:.0f}" for e in last))

    from flexattn_ops import triton_tuning

    print("one-launch choices:", {k: v for k, v in triton_tuning.known_configs().items() if k.startswith("bwd|")})


if __name__ == "__main__":
    main()
