"""One SM90 forward call for Nsight Compute: `ncu --clock-control none -k regex:fwd_kernel
--launch-skip 1 --launch-count 1 python benchmarks/profile_cuda_fwd.py SEQLEN HEADDIM CAUSAL`.

The first call warms up (and JIT-builds the extension if needed); the second is the profiled one.
Shapes follow the benchmark grid: hidden 2048 (heads = 2048 / head dim), batch = 16384 / seqlen, bf16.
"""

from __future__ import annotations

import math
import os
import sys

import torch

os.environ["FLEXATTN_BACKEND"] = "cuda"

import flexattn_ops  # noqa: E402,F401  (registers torch.ops.flexattn)
from flexattn_ops.params import AttnArgs  # noqa: E402


def main() -> None:
    s, d, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    b, h = max(1, 16384 // s), 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = AttnArgs(softmax_scale=1 / math.sqrt(d), window_right=0 if causal else -1)
    for _ in range(2):
        torch.ops.flexattn.fwd(q, k, v, *a)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
