"""Quick GPU smoke check (seconds): a handful of kernels compile and match the oracle; stop early if not."""

from __future__ import annotations

import os
import sys

import torch

os.environ["FLEXATTN_BACKEND"] = "triton"
os.environ["FLEXATTN_TRITON_AUTOTUNE"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.triton_cases import Case, check_case  # noqa: E402

BF16 = torch.bfloat16
for c in (
    Case(dtype=BF16, sq=300, sk=500, d=64, dv=64),
    Case(dtype=BF16, sq=500, sk=300, d=128, dv=128, causal=True, hq=4, hk=2, hv=1),
    Case(dtype=torch.float16, sq=200, sk=200, d=111, dv=40, bias=(2, 2, 200, 200), sinks=True, dropout_p=0.1),
    Case(dtype=BF16, sq=129, sk=257, d=256, dv=256, window=(50, 10), softcap=20.0, alibi="h"),
):
    check_case(c, "cuda")
    print("ok", c.d, c.dv, c.dtype, flush=True)
