"""Errors of the SM90 forward on keys scaled up towards the start, the inputs of
`tests/test_cuda_backend.py::test_gpu_row_maxima_growing_across_key_blocks`, over 8 seeds each.

Prints, per (head dim, growth), the case with the largest out error: that error, the bf16 baseline's,
|ref| where it occurs, the LSE errors, and the largest error over the test's bound (atol 1e-2 +
rtol 1e-2 x |ref|; <= 1 passes). Run from the repository root on an SM90 GPU:
`PYTHONPATH=. python benchmarks/growing_maxima_errors.py`.
"""

from __future__ import annotations

import os

import torch

os.environ["FLEXATTN_BACKEND"] = "cuda"

import flexattn_ops  # noqa: E402,F401  (registers torch.ops.flexattn)
from flexattn_ops.params import AttnArgs  # noqa: E402
from flexattn_ops.testing import attention_ref  # noqa: E402
from tests.helpers import keys_growing_towards_start, rand_qkv  # noqa: E402

BF16 = torch.bfloat16


def errors(d: int, growth: float, causal: bool) -> tuple[float, ...]:
    """(out error, baseline's, ref at the worst element, lse error, baseline's, error over the bound)."""
    q, k, v = rand_qkv(2, 203, 1023, 4, 2, 2, d, d, BF16, device="cuda")
    k = keys_growing_towards_start(k, growth)
    a = AttnArgs(softmax_scale=d**-0.5, window_right=0 if causal else -1)
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    ref, ref_lse = attention_ref(q, k, v, causal=causal)
    base, base_lse = attention_ref(q, k, v, causal=causal, compute_dtype=BF16)
    err = (out.double() - ref).abs()
    return (
        err.max().item(),
        (base.double() - ref).abs().max().item(),
        ref.flatten()[err.argmax()].item(),
        (lse.double() - ref_lse).abs().max().item(),
        (base_lse.double() - ref_lse).abs().max().item(),
        (err / (1e-2 + 1e-2 * ref.abs())).max().item(),
    )


def main() -> None:
    for d in (64, 128, 256):
        for growth in (3.0, 0.4):
            worst: tuple = ()
            for seed in range(8):
                torch.manual_seed(seed)
                for causal in (False, True):
                    row = errors(d, growth, causal)
                    if not worst or row[0] > worst[0]:
                        worst = (*row, seed, causal)
            out_err, base_err, ref_there, lse_err, base_lse_err, over, seed, causal = worst
            print(
                f"d={d} growth={growth}: out err {out_err:.4f} (bf16 base {base_err:.4f}, ref there {ref_there:.3f}), "
                f"lse err {lse_err:.2e} (base {base_lse_err:.2e}), err/(1e-2+1e-2|ref|) {over:.2f}, "
                f"seed {seed} causal {causal}"
            )


if __name__ == "__main__":
    main()
