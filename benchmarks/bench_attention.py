"""Attention benchmark: our Triton backend beside the peers, same process, same inputs (BENCHMARKS.md).

Grid (flash-attn's): hidden 2048, heads = 2048 / head_dim (for qk != v pairs: 2048 / min(dqk, dv),
as `shared/bench/peers.py`), batch = 16384 / seqlen, bf16, causal and not, forward and
forward+backward. FLOPs: fwd = 2 * b * h * sq * sk * (dqk + dv), halved when causal; fwd+bwd = 3.5x fwd.
Times: `triton.testing.do_bench` medians (CUDA events) after warm-up, random inputs. With `--rounds R`
every implementation is measured R times a shape, in alternating order, and the median kept (single runs
of the same kernels moved by 2-3% between processes at 2k-8k, as much as the differences measured).

Peers: PyTorch SDPA with the flash backend (FlashAttention-2), the cuDNN backend, and compiled
FlexAttention (one compile per shape and grad mode, as in peers.py). Ours: `flash_attn_func` in eager
code (since session 7; before, `torch.ops.flexattn.fwd` through the dispatcher) with
FLEXATTN_BACKEND=triton (impl "triton") or =cuda (impl "cuda": the SM90 forward; its backward is Triton's).

Usage: python benchmarks/bench_attention.py [--part core|pairs|all] [--seqs 512,2048,8192,16384]
    [--impls cuda,triton,sdpa_flash,sdpa_cudnn,flex] [--modes fwd,fwd_bwd] [--dims 128x128] [--rounds 3]
Prints a TFLOP/s table with ratios of ours to the peers; writes $OUT/bench_<part>.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flexattn_ops import flash_attn_func  # noqa: E402

DT = torch.bfloat16
DEV = "cuda"
OUT = os.environ.get("OUT", "/tmp")
CORE_DIMS = [(64, 64), (128, 128), (256, 256)]
PAIRS = [(192, 128), (128, 256), (64, 128), (32, 64)]


def flops(b: int, h: int, s: int, dqk: int, dv: int, causal: bool, mode: str) -> float:
    f = 2.0 * b * h * s * s * (dqk + dv) / (2 if causal else 1)
    return f * {"fwd": 1.0, "fwd_bwd": 3.5}[mode]


def bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


OURS = ("cuda", "triton")
PEERS = ("flex", "sdpa_flash", "sdpa_cudnn")


def ours_fn(causal: bool, backend: str) -> Callable:
    """(b, h, s, d) inputs like SDPA's; ours takes (b, s, h, d), so pass transposed views (strided inputs).
    Through the public API, as users call it (in eager code that skips the dispatcher: ops.attention_fwd)."""

    def fn(q, k, v):
        os.environ["FLEXATTN_BACKEND"] = backend  # read by dispatch at each call
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)

    return fn


def sdpa_fn(backend, causal: bool) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


_flex = None


def flex_fn(causal: bool, s: int) -> Callable:
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex is None:
        torch._dynamo.config.recompile_limit = 10**6
        torch._dynamo.config.accumulated_recompile_limit = 10**6
        _flex = torch.compile(flex_attention, dynamic=False)

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    bm = create_block_mask(causal_mask, None, None, s, s, device=DEV) if causal else None
    flex = _flex

    def fn(q, k, v):
        return flex(q, k, v, block_mask=bm)

    return fn


def measure(fn: Callable, q, k, v, mode: str) -> tuple[Optional[float], str]:
    try:
        if mode == "fwd":
            with torch.no_grad():
                return bench_ms(lambda: fn(q, k, v)), ""
        qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
        g = torch.randn_like(fn(qg, kg, vg))

        def fb():
            fn(qg, kg, vg).backward(g)

        return bench_ms(fb), ""
    except Exception as e:  # noqa: BLE001  (a peer without a kernel for this shape: recorded, not fatal)
        torch.cuda.empty_cache()
        return None, f"{type(e).__name__}: {str(e)[:90]}"


def run(
    dims: list[tuple[int, int]],
    seqs: list[int],
    impls: list[str],
    modes: list[str],
    rows: list[dict],
    deadline: float,
    rounds: int = 1,
) -> None:
    from torch.nn.attention import SDPBackend

    for dqk, dv in dims:
        h = 2048 // min(dqk, dv)
        for causal in (False, True):
            for s in seqs:
                if time.time() > deadline:
                    print(f"budget spent: skipping d={dqk}/{dv} causal={int(causal)} s={s}", flush=True)
                    continue
                b = max(1, 16384 // s)
                q = torch.randn(b, h, s, dqk, device=DEV, dtype=DT)
                k = torch.randn(b, h, s, dqk, device=DEV, dtype=DT)
                v = torch.randn(b, h, s, dv, device=DEV, dtype=DT)
                makers = {
                    "triton": lambda c=causal: ours_fn(c, "triton"),
                    "cuda": lambda c=causal: ours_fn(c, "cuda"),
                    "sdpa_flash": lambda c=causal: sdpa_fn(SDPBackend.FLASH_ATTENTION, c),
                    "sdpa_cudnn": lambda c=causal: sdpa_fn(SDPBackend.CUDNN_ATTENTION, c),
                    "flex": lambda c=causal, s=s: flex_fn(c, s),
                }
                fns = {impl: makers[impl]() for impl in impls}
                for mode in modes:
                    # rounds alternate the order of the implementations; each one's median over the rounds is
                    # kept, so a clock or thermal drift during one shape does not favour whoever ran first
                    times: dict[str, list[float]] = {impl: [] for impl in impls}
                    notes = dict.fromkeys(impls, "")
                    t0 = time.time()
                    for r in range(rounds):
                        for impl in impls if r % 2 == 0 else impls[::-1]:
                            ms, notes[impl] = measure(fns[impl], q, k, v, mode)
                            if ms:
                                times[impl].append(ms)
                    for impl in impls:
                        ms = statistics.median(times[impl]) if times[impl] else None
                        tf = flops(b, h, s, dqk, dv, causal, mode) / (ms * 1e-3) / 1e12 if ms else float("nan")
                        rows.append(
                            dict(
                                impl=impl,
                                b=b,
                                h=h,
                                s=s,
                                dqk=dqk,
                                dv=dv,
                                causal=int(causal),
                                mode=mode,
                                ms=round(ms, 4) if ms else "",
                                tflops=round(tf, 1),
                                note=notes[impl],
                            )
                        )
                        spread = ""
                        if rounds > 1 and ms:
                            spread = f"rounds {min(times[impl]):.3f}-{max(times[impl]):.3f} ms "
                        print(
                            f"{impl:11s} d={dqk}/{dv} causal={int(causal)} s={s:5d} {mode:7s} "
                            f"{tf:7.1f} TFLOP/s  {spread}({time.time() - t0:.1f}s) {notes[impl]}",
                            flush=True,
                        )
                del q, k, v
                torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    """Markdown table: each implementation in TFLOP/s, then each of ours / each peer."""
    key = lambda r: (r["dqk"], r["dv"], r["causal"], r["s"], r["mode"])  # noqa: E731
    by: dict = {}
    for r in rows:
        by.setdefault(key(r), {})[r["impl"]] = r["tflops"]
    present = {r["impl"] for r in rows}
    ours = [i for i in OURS if i in present]
    peers = [i for i in PEERS if i in present]
    pairs = [(o, p) for o in ours for p in peers]
    head = ["dqk/dv", "causal", "seqlen", "mode", *ours, *peers, *(f"{o} / {p}" for o, p in pairs)]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | ---: | --- |" + " ---: |" * (len(head) - 4)]

    def fmt(x):
        return "-" if x is None or x != x else f"{x:.0f}"

    def ratio(a, b):
        return "-" if a is None or b is None or a != a or b != b or b == 0 else f"{a / b:.2f}"

    for (dqk, dv, causal, s, mode), d in sorted(by.items()):
        cells = [f"{dqk}/{dv}", str(causal), str(s), mode]
        cells += [fmt(d.get(i)) for i in ours + peers]
        cells += [ratio(d.get(o), d.get(p)) for o, p in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["core", "pairs", "all"])
    ap.add_argument("--seqs", default="512,2048,8192,16384")
    ap.add_argument("--pair-seqs", default="2048,8192")
    ap.add_argument("--impls", default="triton,sdpa_flash,sdpa_cudnn,flex")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--dims", default="", help="override: comma-separated dqk x dv pairs, e.g. 64x64,192x128")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: start no new shape after this")
    ap.add_argument("--rounds", type=int, default=1, help="measure every implementation this many times a shape")
    args = ap.parse_args()
    seqs = [int(x) for x in args.seqs.split(",")]
    impls = args.impls.split(",")
    modes = args.modes.split(",")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda, flush=True)
    import triton

    print("triton", triton.__version__, "cudnn", torch.backends.cudnn.version(), flush=True)
    rows: list[dict] = []
    t0 = time.time()
    try:
        deadline = time.time() + args.budget
        if args.dims:
            dims = [(int(p.split("x")[0]), int(p.split("x")[1])) for p in args.dims.split(",")]
            run(dims, seqs, impls, modes, rows, deadline, args.rounds)
        if args.part in ("core", "all") and not args.dims:
            run(CORE_DIMS, seqs, impls, modes, rows, deadline, args.rounds)
        if args.part in ("pairs", "all"):
            run(PAIRS, [int(x) for x in args.pair_seqs.split(",")], impls, modes, rows, deadline, args.rounds)
    finally:
        if rows:
            path = os.path.join(OUT, f"bench_{args.part}.csv")
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                w.writeheader()
                w.writerows(rows)
            print(table(rows), flush=True)
        print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
