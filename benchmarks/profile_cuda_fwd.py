"""One attention forward call for Nsight Compute: `ncu --clock-control none --nvtx --nvtx-include
profiled/ python benchmarks/profile_cuda_fwd.py SEQLEN HEADDIM CAUSAL [IMPL]`.

IMPL is `cuda` (ours, the default) or `cudnn` (PyTorch's SDPA on cuDNN, the peer). The first call warms
up (and JIT-builds the extension if needed); the second runs inside the NVTX range `profiled`.
Shapes follow the benchmark grid: hidden 2048 (heads = 2048 / head dim), batch = 16384 / seqlen, bf16.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

os.environ["FLEXATTN_BACKEND"] = "cuda"

import flexattn_ops  # noqa: E402,F401  (registers torch.ops.flexattn)
from flexattn_ops.params import AttnArgs  # noqa: E402


def main() -> None:
    s, d, causal = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    impl = sys.argv[4] if len(sys.argv) > 4 else "cuda"
    b, h = max(1, 16384 // s), 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if impl == "cudnn":
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def call() -> None:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    else:
        a = AttnArgs(softmax_scale=1 / math.sqrt(d), window_right=0 if causal else -1)

        def call() -> None:
            torch.ops.flexattn.fwd(q, k, v, *a)

    call()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profiled")
    call()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
