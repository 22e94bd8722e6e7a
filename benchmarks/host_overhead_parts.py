"""Host cost of one eager attention call, split into its layers (torch.library machinery, validation and
dispatch, the Triton launch), on tiny CUDA tensors where the GPU work is a few microseconds.

Each line: microseconds per call, wall time over N calls with one synchronisation at the end.
Usage (on the device): python benchmarks/host_overhead_parts.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("FLEXATTN_BACKEND", "triton")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from profile_host_overhead import wall_us  # noqa: E402
from torch.library import Library, custom_op  # noqa: E402

from flexattn_ops import dispatch, ops, triton_backend  # noqa: E402
from flexattn_ops.params import ATTN_SCHEMA, AttnArgs  # noqa: E402
from flexattn_ops.validation import check_attention  # noqa: E402

N = 1000


def _empty(q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


SCHEMA = f"(Tensor q, Tensor k, Tensor v, {ATTN_SCHEMA}) -> (Tensor, Tensor)"


@custom_op("hostparts::custom", mutates_args=(), schema=SCHEMA)
def custom_empty(q, k, v, *args):
    return _empty(q, k, v)


custom_empty.register_fake(_empty)
custom_empty.register_autograd(
    lambda ctx, do, dl: (None,) * (3 + len(AttnArgs._fields)), setup_context=lambda ctx, inputs, output: None
)

_lib = Library("hostparts", "FRAGMENT")
_lib.define("plain" + SCHEMA)
_lib.impl("plain", _empty, "CUDA")


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, 128, 16, 128, device=dev, dtype=dt) for _ in range(3))
    qg = q.clone().requires_grad_()
    a = AttnArgs(softmax_scale=128**-0.5, window_right=0)  # causal
    rows = {
        "python: empty function": lambda: _empty(q, k, v, *a),
        "Library op (define/impl), empty": lambda: torch.ops.hostparts.plain.default(q, k, v, *a),
        "custom_op, empty": lambda: torch.ops.hostparts.custom.default(q, k, v, *a),
        "custom_op, empty, q requires grad": lambda: torch.ops.hostparts.custom.default(qg, k, v, *a),
        "validation": lambda: check_attention(q, k, v, a),
        "dispatch.select": lambda: dispatch.select("fwd", q, k, v, a),
        "triton_backend.fwd (launch only)": lambda: triton_backend.fwd(q, k, v, a),
        "torch.ops.flexattn.fwd": lambda: torch.ops.flexattn.fwd.default(q, k, v, *a),
        "torch.ops.flexattn.fwd, q requires grad": lambda: torch.ops.flexattn.fwd.default(qg, k, v, *a),
        "SDPA (b, h, s, d)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ),
    }
    out, lse = torch.ops.flexattn.fwd.default(q, k, v, *a)
    dout = torch.randn_like(out)
    bwd_args = (dout, q, k, v, out, lse)
    rows.update(
        {
            "triton_backend.bwd (launches only)": lambda: triton_backend.bwd(*bwd_args, a, False),
            "bwd op's implementation (ops._bwd_impl)": lambda: ops._bwd_impl(*bwd_args, *a, False),
            "torch.ops.flexattn.bwd": lambda: torch.ops.flexattn.bwd.default(*bwd_args, *a, False),
            "fwd + bwd through autograd": lambda: torch.autograd.grad(
                torch.ops.flexattn.fwd.default(qg, k, v, *a)[0], (qg,), dout
            ),
        }
    )
    for name, fn in rows.items():
        print(f"{wall_us(fn, N):8.1f} us  {name}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
