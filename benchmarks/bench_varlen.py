"""Varlen forward vs dense forward on the Triton backend at the same total tokens (issue 5's target:
varlen within 10% of dense).

bf16, hq = hk = hv = 16, head dim 128 (hidden 2048), 16384 tokens in all, causal and not. Rows:
- ``dense``: q/k/v (4, 4096, 16, 128);
- ``varlen_equal``: the same 4 x 4096 tokens packed (cu_seqlens), so the same FLOPs: time ratio;
- ``paged_equal``: those keys in a paged cache (pages of 256 and of 16 slots, shuffled pages);
- ``varlen_mixed``: 16384 tokens as mixed lengths (seeded draws in [128, 4096]); compared with dense
  in TFLOP/s, since mixed lengths do less work (sum of l^2, not b * s^2).
FLOPs: 2 * h * l^2 * (dqk + dv) per sequence, halved when causal (bench_attention.py's convention).
Times: `triton.testing.do_bench` medians. Prints a table; writes $OUT/bench_varlen.csv.
"""

from __future__ import annotations

import csv
import math
import os
import sys

import torch

os.environ["FLEXATTN_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flexattn_ops  # noqa: E402,F401  (registers torch.ops.flexattn)
from flexattn_ops.params import AttnArgs  # noqa: E402

DT = torch.bfloat16
H, D, TOTAL, SEQ = 16, 128, 16384, 4096
OUT = os.environ.get("OUT", "/tmp")


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def mixed_lengths(total: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Lengths drawn uniformly in [lo, hi] until `total` tokens; the last one takes the remainder."""
    g = torch.Generator().manual_seed(seed)
    lens: list[int] = []
    while sum(lens) < total:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        lens.append(min(n, total - sum(lens)))
    return lens


def flops(lens: list[int], causal: bool) -> float:
    return sum(2.0 * H * n * n * (D + D) for n in lens) / (2 if causal else 1)


def cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def varlen_fn(lens: list[int], causal: bool, page: int = 0):
    """A closure running the varlen forward on packed (page 0) or paged keys."""
    q = torch.randn(sum(lens), H, D, device="cuda", dtype=DT)
    k, v = torch.randn_like(q), torch.randn_like(q)
    table = None
    if page:
        blocks = -(-max(lens) // page)
        perm = torch.randperm(len(lens) * blocks, device="cuda")
        table = perm.view(len(lens), blocks).to(torch.int32)
        k_cache = torch.randn(len(lens) * blocks, page, H, D, device="cuda", dtype=DT)
        k, v = k_cache, torch.randn_like(k_cache)
    a = AttnArgs(cu(lens), cu(lens), None, table, max(lens), max(lens), 1.0 / math.sqrt(D), -1, 0 if causal else -1)
    return lambda: torch.ops.flexattn.fwd(q, k, v, *a)


def dense_fn(b: int, s: int, causal: bool):
    q = torch.randn(b, s, H, D, device="cuda", dtype=DT)
    k, v = torch.randn_like(q), torch.randn_like(q)
    a = AttnArgs(softmax_scale=1.0 / math.sqrt(D), window_right=0 if causal else -1)
    return lambda: torch.ops.flexattn.fwd(q, k, v, *a)


def main() -> None:
    mixed = mixed_lengths(TOTAL, 128, SEQ)
    equal = [SEQ] * (TOTAL // SEQ)
    import triton

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"mixed lengths ({len(mixed)} sequences): {mixed}")
    rows = []
    for causal in (False, True):
        dense_ms = bench_ms(dense_fn(TOTAL // SEQ, SEQ, causal))
        dense_tf = flops(equal, causal) / dense_ms * 1e-9
        cases = [
            ("dense", equal, None),
            ("varlen_equal", equal, varlen_fn(equal, causal)),
            ("paged256_equal", equal, varlen_fn(equal, causal, 256)),
            ("paged16_equal", equal, varlen_fn(equal, causal, 16)),
            ("varlen_mixed", mixed, varlen_fn(mixed, causal)),
        ]
        for name, lens, fn in cases:
            ms = dense_ms if fn is None else bench_ms(fn)
            tf = flops(lens, causal) / ms * 1e-9
            rows.append(
                {
                    "case": name,
                    "causal": int(causal),
                    "ms": round(ms, 4),
                    "tflops": round(tf, 1),
                    "time_vs_dense": round(ms / dense_ms, 3),
                    "tflops_vs_dense": round(tf / dense_tf, 3),
                }
            )
    print("| case | causal | ms | TFLOP/s | time / dense | TFLOP/s / dense |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r.values()) + " |")
    with open(os.path.join(OUT, "bench_varlen.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
