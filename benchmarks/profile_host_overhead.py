"""Where the host time of one eager call goes, for small (launch-bound) shapes on the GPU.

For each case: the eager wall time per call (host + GPU, synchronised once per 200 calls), the GPU
time of the same call replayed from a CUDA graph, and cProfile's top functions by own time.
Usage (on the device): python benchmarks/profile_host_overhead.py   (prints a table; no files)
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable

import torch

from flexattn_ops import flash_attn_func, flash_attn_with_kvcache

N = 200


def wall_us(fn: Callable[[], object], n: int = N) -> float:
    """Microseconds a call of `fn`: wall time over `n` calls with one synchronisation at the end."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def capture_graph(fn: Callable[[], object], calls: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` calls of `fn`, captured after three warm-up calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def graph_us(fn: Callable[[], object]) -> float:
    g = capture_graph(fn)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(N):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / N * 1e3


def profile(name: str, fn: Callable[[], object], graph: bool = True) -> None:
    """Wall time per call, GPU time from a CUDA-graph replay (if `graph`), and cProfile's top functions."""
    eager = wall_us(fn)
    if graph:
        graphed = graph_us(fn)
        host = eager - graphed
        print(f"\n== {name}: eager {eager:.0f} us/call, CUDA graph {graphed:.0f} us/call, host {host:.0f} us")
    else:
        print(f"\n== {name}: eager {eager:.0f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(N):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, 128, 16, 128, device=dev, dtype=dt) for _ in range(3))
    profile("dense fwd b=1 s=128 h=16 d=128", lambda: flash_attn_func(q, k, v, causal=True))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)

    def fwd_bwd() -> None:
        torch.autograd.grad(flash_attn_func(qg, kg, vg, causal=True), (qg, kg, vg), dout)

    profile("dense fwd+bwd (autograd.grad)", fwd_bwd, graph=False)
    sq, sk, sv = (x.transpose(1, 2) for x in (qg, kg, vg))
    dout_t = dout.transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa_us = wall_us(lambda: torch.autograd.grad(sdpa(sq, sk, sv, is_causal=True), (qg, kg, vg), dout_t))
    print(f"SDPA fwd+bwd, for comparison: {sdpa_us:.0f} us/call")
    qd = torch.randn(1, 1, 32, 128, device=dev, dtype=dt)
    kc, vc = (torch.randn(1, 2048, 8, 128, device=dev, dtype=dt) for _ in range(2))
    seqlens = torch.full((1,), 2000, dtype=torch.int32, device=dev)
    profile("decode b=1 kv=2k GQA 32/8", lambda: flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=seqlens))
    print(torch.cuda.get_device_name(), torch.__version__)


if __name__ == "__main__":
    main()
