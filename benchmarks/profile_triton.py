"""Per-kernel GPU time of our Triton forward+backward (torch.profiler), to see where short sequences lose.

Usage: python benchmarks/profile_triton.py [--shapes 64x512,128x2048]  (head dim x seqlen; bf16, grid batch/heads)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

os.environ["FLEXATTN_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flexattn_ops  # noqa: E402,F401
from flexattn_ops.params import AttnArgs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="64x512,128x512,128x2048")
    ap.add_argument("--causal", type=int, default=0)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    for spec in args.shapes.split(","):
        d, s = (int(x) for x in spec.split("x"))
        h, b = 2048 // d, max(1, 16384 // s)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        a = AttnArgs(softmax_scale=1 / math.sqrt(d), window_right=0 if args.causal else -1)
        g = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)

        def step(q=q, k=k, v=v, a=a, g=g):
            out, _ = torch.ops.flexattn.fwd(q, k, v, *a)
            out.backward(g)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"== d={d} s={s} b={b} h={h} causal={args.causal}: per step (10 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40))


if __name__ == "__main__":
    main()
