"""Varlen forward (and forward+backward) vs dense on the Triton backend at the same total tokens (issue
5's targets: varlen within 10% of dense; paged K/V close to packed).

bf16, hq = hk = hv = 16, head dim 128 (hidden 2048), 16384 tokens in all, causal and not. Rows:
- ``dense``: q/k/v (4, 4096, 16, 128);
- ``varlen_equal``: the same 4 x 4096 tokens packed (cu_seqlens), so the same FLOPs: time ratio;
- ``paged<P>_equal``: those keys in a paged cache of P-slot pages (``--pages``, default 256 and 16),
  shuffled pages; ``time_vs_packed`` is its time over ``varlen_equal``'s. The kernels look the page up
  once per key tile when P is a multiple of the config's BLOCK_N (printed per kernel), else per key;
- ``varlen_mixed`` (forward only): 16384 tokens as mixed lengths (seeded draws in [128, 4096]);
  compared with dense in TFLOP/s, since mixed lengths do less work (sum of l^2, not b * s^2).
``--modes fwd,fwd_bwd``: forward alone, and forward + backward (torch.autograd.grad for q, k, v; a paged
cache's dK/dV include the host's sum onto the pages).
FLOPs: 2 * h * l^2 * (dqk + dv) per sequence, halved when causal, x3.5 for fwd_bwd (bench_attention.py's
convention). Times: `triton.testing.do_bench` medians. Prints a table; writes $OUT/bench_varlen.csv.
"""

from __future__ import annotations

import argparse
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


def flops(lens: list[int], causal: bool, mode: str) -> float:
    f = sum(2.0 * H * n * n * (D + D) for n in lens) / (2 if causal else 1)
    return f * {"fwd": 1.0, "fwd_bwd": 3.5}[mode]


def cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def _step(q, k, v, a: AttnArgs, mode: str):
    """A closure running the forward, or forward + backward (gradients of q, k, v) of one call."""
    if mode == "fwd":
        return lambda: torch.ops.flexattn.fwd(q, k, v, *a)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device="cuda", dtype=DT)

    def fn():
        out, _ = torch.ops.flexattn.fwd(q, k, v, *a)
        return torch.autograd.grad(out, (q, k, v), dout)

    return fn


def varlen_fn(lens: list[int], causal: bool, mode: str, page: int = 0):
    """A closure running the varlen op on packed (page 0) or paged keys."""
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
    return _step(q, k, v, a, mode)


def dense_fn(b: int, s: int, causal: bool, mode: str):
    q = torch.randn(b, s, H, D, device="cuda", dtype=DT)
    k, v = torch.randn_like(q), torch.randn_like(q)
    a = AttnArgs(softmax_scale=1.0 / math.sqrt(D), window_right=0 if causal else -1)
    return _step(q, k, v, a, mode)


def page_paths(pages: list[int], causal: bool, mode: str) -> str:
    """Which page lookup each kernel takes with the tiles this process uses (per tile / per key)."""
    from flexattn_ops import triton_tuning as tuning

    out = []
    for kernel in ("fwd",) + (("dkdv", "dq") if mode == "fwd_bwd" else ()):
        cfg = tuning.get_config(kernel, torch.device("cuda"), DT, D, D, causal, None, SEQ)
        paths = ", ".join(
            f"page {p}: {'tile' if tuning.page_tile_aligned(p, cfg['BLOCK_N']) else 'key'}" for p in pages
        )
        out.append(f"{kernel} BLOCK_N {cfg['BLOCK_N']} ({paths})")
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="fwd", help="comma-separated: fwd, fwd_bwd")
    ap.add_argument("--pages", default="256,16", help="comma-separated page sizes of the paged rows")
    args = ap.parse_args()
    modes = args.modes.split(",")
    pages = [int(p) for p in args.pages.split(",") if p]
    mixed = mixed_lengths(TOTAL, 128, SEQ)
    equal = [SEQ] * (TOTAL // SEQ)
    import triton

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"mixed lengths ({len(mixed)} sequences): {mixed}")
    rows = []
    for mode in modes:
        for causal in (False, True):
            dense_ms = bench_ms(dense_fn(TOTAL // SEQ, SEQ, causal, mode))
            dense_tf = flops(equal, causal, mode) / dense_ms * 1e-9
            packed_ms = bench_ms(varlen_fn(equal, causal, mode))
            cases = [("dense", equal, dense_ms), ("varlen_equal", equal, packed_ms)]
            cases += [(f"paged{p}_equal", equal, bench_ms(varlen_fn(equal, causal, mode, p))) for p in pages]
            if mode == "fwd":
                cases.append(("varlen_mixed", mixed, bench_ms(varlen_fn(mixed, causal, mode))))
            print(f"{mode} causal={int(causal)}: {page_paths(pages, causal, mode)}")
            for name, lens, ms in cases:
                tf = flops(lens, causal, mode) / ms * 1e-9
                rows.append(
                    {
                        "case": name,
                        "mode": mode,
                        "causal": int(causal),
                        "ms": round(ms, 4),
                        "tflops": round(tf, 1),
                        "time_vs_dense": round(ms / dense_ms, 3),
                        "tflops_vs_dense": round(tf / dense_tf, 3),
                        "time_vs_packed": round(ms / packed_ms, 3) if lens is equal else "",
                    }
                )
                print("  " + ", ".join(f"{k}={v}" for k, v in rows[-1].items()))  # as measured: a cut run keeps them
    print("| case | mode | causal | ms | TFLOP/s | time / dense | TFLOP/s / dense | time / packed |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r.values()) + " |")
    with open(os.path.join(OUT, "bench_varlen.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
