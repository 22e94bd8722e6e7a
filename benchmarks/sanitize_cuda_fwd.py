"""compute-sanitizer target: a few small calls of the SM90 forward covering every code path.

Run as `PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python
benchmarks/sanitize_cuda_fwd.py` (each tensor its own allocation, so an out-of-bounds access
is not hidden inside a cached block). Dense and varlen (with padding rows and an empty
sequence), causal, window, softcap, GQA with hk != hv, padded head dims, seqlen 1, hd128's clusters, a late start.
"""

from __future__ import annotations

import math
import os

import torch

os.environ["FLEXATTN_BACKEND"] = "cuda"

import flexattn_ops  # noqa: E402,F401  (registers torch.ops.flexattn)
from flexattn_ops.params import AttnArgs  # noqa: E402

DEV, DT = "cuda", torch.bfloat16


def dense(b: int, sq: int, sk: int, hq: int, hk: int, hv: int, dqk: int, dv: int, **kw) -> None:
    q = torch.randn(b, sq, hq, dqk, device=DEV, dtype=DT)
    k = torch.randn(b, sk, hk, dqk, device=DEV, dtype=DT)
    v = torch.randn(b, sk, hv, dv, device=DEV, dtype=DT)
    torch.ops.flexattn.fwd(q, k, v, *AttnArgs(softmax_scale=1 / math.sqrt(dqk), **kw))


def varlen(lens_q: list[int], lens_k: list[int], pad: int, dqk: int, dv: int, **kw) -> None:
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    q = torch.randn(sum(lens_q) + pad, 4, dqk, device=DEV, dtype=DT)
    k = torch.randn(sum(lens_k), 2, dqk, device=DEV, dtype=DT)
    v = torch.randn(sum(lens_k), 1, dv, device=DEV, dtype=DT)
    a = AttnArgs(
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
        softmax_scale=1 / math.sqrt(dqk),
        **kw,
    )
    torch.ops.flexattn.fwd(q, k, v, *a)


def main() -> None:
    for dqk, dv in ((128, 128), (64, 64), (256, 256), (192, 128), (128, 256), (72, 40)):
        dense(2, 113, 203, 4, 2, 1, dqk, dv)
        dense(1, 203, 113, 2, 2, 2, dqk, dv, window_right=0)
        dense(1, 300, 300, 2, 1, 2, dqk, dv, window_left=50, window_right=7, softcap=10.0)
        dense(3, 1, 129, 4, 4, 4, dqk, dv)
        varlen([5, 0, 130, 1], [7, 33, 0, 200], 9, dqk, dv)
        varlen([64, 17], [64, 250], 0, dqk, dv, window_right=0)
    # hd128's 2-CTA clusters (K/V multicast; launch.cuh): rows of > 1024 keys, an even number of query
    # blocks a head and >= 2 tiles per SM; 1100 keys leave rank 1's half of the last key block past the keys
    dense(2, 1280, 1100, 17, 17, 17, 128, 128)
    # more tiles than SMs on a static schedule, not a multiple of them: the CTAs with one tile fewer start late
    dense(3, 512, 512, 16, 16, 16, 128, 128)
    torch.cuda.synchronize()
    print("sanitize_cuda_fwd: done")


if __name__ == "__main__":
    main()
