"""A/B of the backward's one-launch choice against FlexAttention: fwd+bwd of the benchmark grid's shapes with
the tuned choice ("tuned": one launch where the table says so) or forced to two launches ("two"), beside
compiled FlexAttention, in interleaved rounds (the order alternates each round) in one process; prints each
implementation's median and its range over the rounds. Why: the tuner times the choice at seqlen 4096 only,
and single runs at 16k moved by up to 10%.

Usage: python benchmarks/ab_one_launch.py [--shapes 128x16384,64x2048] [--causal 0|1] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import flops, measure  # noqa: E402
from profile_triton import impl_fn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="128x16384,128x8192,128x2048,64x16384,64x2048")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    causal = bool(args.causal)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for spec in args.shapes.split(","):
        d, s = (int(x) for x in spec.split("x"))
        h, b = 2048 // d, max(1, 16384 // s)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        impls = {"tuned": "triton", "two": "triton-split", "flex": "flex"}  # profile_triton.impl_fn's names
        times: dict[str, list[float]] = {name: [] for name in impls}
        for r in range(args.rounds):
            for name in list(impls) if r % 2 == 0 else list(impls)[::-1]:
                # impl_fn sets the launch choice for what runs next, so it is called before every measurement
                ms, note = measure(impl_fn(impls[name], causal, s), q, k, v, "fwd_bwd")
                if ms is None:
                    raise RuntimeError(f"{name}: {note}")
                times[name].append(ms)
        impl_fn("triton", causal, s)  # the tuned choice back
        flex_ms = statistics.median(times["flex"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            tf = flops(b, h, s, d, d, causal, "fwd_bwd") / (ms * 1e-3) / 1e12
            print(
                f"d={d} s={s:5d} causal={int(causal)} {name:5s} {ms:8.3f} ms  {tf:6.1f} TFLOP/s  "
                f"{flex_ms / ms:5.3f}x Flex  rounds {min(ts):.3f}-{max(ts):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
