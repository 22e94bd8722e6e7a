"""Host cost of one eager forward on the CUDA (SM90) path, split into its layers, on a tiny shape where the
GPU work is a few microseconds; then cProfile's top functions of the whole `flash_attn_func` call.

Each line: microseconds per call, wall time over N calls with one synchronisation at the end.
Usage (on an H100/H200, the extension built): python benchmarks/host_overhead_cuda.py
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys

os.environ["FLEXATTN_BACKEND"] = "cuda"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from profile_host_overhead import wall_us  # noqa: E402

from flexattn_ops import cuda_backend, dispatch, flash_attn_func  # noqa: E402
from flexattn_ops.params import AttnArgs  # noqa: E402
from flexattn_ops.validation import check_attention  # noqa: E402

N = 1000


def main() -> None:
    q, k, v = (torch.randn(1, 128, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = AttnArgs(softmax_scale=128**-0.5)
    out, lse = torch.empty_like(q), torch.empty(1, 16, 128, device="cuda", dtype=torch.float32)
    flash_attn_func(q, k, v)  # loads the extension (torch.ops.flexattn_cuda)
    rows = {
        "binding: torch.ops.flexattn_cuda.fwd_sm90": lambda: torch.ops.flexattn_cuda.fwd_sm90(
            q, k, v, out, lse, None, None, None, 128, float(a.softmax_scale), -1, -1, 0.0
        ),
        "cuda_backend.fwd (allocations + binding)": lambda: cuda_backend.fwd(q, k, v, a),
        "cuda_backend.unsupported": lambda: cuda_backend.unsupported("fwd", q, k, v, a),
        "dispatch.select": lambda: dispatch.select("fwd", q, k, v, a),
        "validation": lambda: check_attention(q, k, v, a),
        "torch.ops.flexattn.fwd": lambda: torch.ops.flexattn.fwd.default(q, k, v, *a),
        "flash_attn_func": lambda: flash_attn_func(q, k, v),
        "SDPA cuDNN (b, h, s, d)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ),
    }
    for name, fn in rows.items():
        print(f"{wall_us(fn, N):8.1f} us  {name}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(N):
        flash_attn_func(q, k, v)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(16)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
