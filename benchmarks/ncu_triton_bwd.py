"""Forward+backward steps of one implementation for Nsight Compute (see ncu_triton_bwd.sh): 3 warm-up steps,
then one more, so `--launch-skip` can pick the last step's backward kernels.

Usage: python benchmarks/ncu_triton_bwd.py IMPL HEADDIM SEQLEN CAUSAL  (IMPL: triton, triton-split or flex)
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_triton import impl_fn  # noqa: E402


def main() -> None:
    impl, d, s, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    h, b = 2048 // d, max(1, 16384 // s)
    fn = impl_fn(impl, causal, s)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(fn(q, k, v))
    for _ in range(4):
        fn(q, k, v).backward(g)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
