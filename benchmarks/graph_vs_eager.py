"""Round-by-round timing of the CUDA forward, eager and replayed from a CUDA graph, beside cuDNN's SDPA, plus
the host time of one eager call: tells whether slow rounds of a short-sequence shape come from the host.

Usage (on the device, the extension built): python benchmarks/graph_vs_eager.py [SEQLEN HEADDIM ROUNDS]
(default 512 128 8; batch 16384 / SEQLEN, heads 2048 / HEADDIM, bf16, non-causal). Prints; no files.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_host_overhead import capture_graph  # noqa: E402

from flexattn_ops import flash_attn_func  # noqa: E402

GRAPH_CALLS = 10  # forward calls captured in one graph


def main() -> None:
    seqlen, head_dim, rounds = (int(a) for a in (sys.argv[1:4] if len(sys.argv) > 3 else (512, 128, 8)))
    batch, heads = 16384 // seqlen, 2048 // head_dim
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    flops = 4 * batch * heads * seqlen * seqlen * head_dim

    def ours() -> torch.Tensor:
        return flash_attn_func(q, k, v)

    def cudnn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    graph = capture_graph(ours, GRAPH_CALLS)
    cudnn()
    torch.cuda.synchronize()
    print(f"seqlen {seqlen}, head dim {head_dim}, batch {batch}, heads {heads}: TFLOP/s per round")
    for r in range(rounds):
        eager_ms = triton.testing.do_bench(ours, warmup=25, rep=200)
        graph_ms = triton.testing.do_bench(graph.replay, warmup=5, rep=200) / GRAPH_CALLS
        cudnn_ms = triton.testing.do_bench(cudnn, warmup=25, rep=200)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):  # far fewer than the launch queue holds: the loop measures the host alone
            ours()
        host_us = (time.perf_counter() - start) / 100 * 1e6
        torch.cuda.synchronize()
        print(
            f"round {r}: ours eager {flops / eager_ms / 1e9:.0f}, graph {flops / graph_ms / 1e9:.0f}, "
            f"cudnn {flops / cudnn_ms / 1e9:.0f}; host time of one eager call {host_us:.1f} us"
        )


if __name__ == "__main__":
    main()
