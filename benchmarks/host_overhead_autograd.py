"""Host time of a fwd+bwd step through autograd, ours beside compiled FlexAttention and SDPA, on a shape so
small (b=1, s=128, h=16, d=128, causal) that the GPU work is a few microseconds: what is timed is the host.

Each row: microseconds per step, wall time over N steps with one synchronisation at the end, measured in R
rounds that alternate between the rows (the lent hosts' speed drifts by tens of percent within minutes);
min and median over the rounds. Then a cProfile of our backward on the thread that runs it: on CUDA tensors
autograd runs the backward on its per-device worker thread, which cProfile on the main thread cannot see.

Usage (on the device): python benchmarks/host_overhead_autograd.py [--rounds 7]   (prints; no files)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys

os.environ.setdefault("FLEXATTN_BACKEND", "triton")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_attention import flex_fn  # noqa: E402
from profile_host_overhead import wall_us  # noqa: E402

from flexattn_ops import flash_attn_func, ops, triton_backend  # noqa: E402
from flexattn_ops.params import AttnArgs  # noqa: E402

N = 200


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    dev, dt = "cuda", torch.bfloat16
    shape = (1, 128, 16, 128)
    q, k, v = (torch.randn(shape, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=dev, dtype=dt)
    causal = AttnArgs(softmax_scale=shape[-1] ** -0.5, window_right=0)
    out, lse = ops._FWD(q.detach(), k.detach(), v.detach(), *causal)
    qkv_t = tuple(x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))  # (b, h, s, d) for the peers
    dout_t = dout.transpose(1, 2)
    flex = flex_fn(True, shape[1])
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def grad(fn, inputs, g):
        return lambda: torch.autograd.grad(fn(*inputs), inputs, g)

    def eager_step_single_thread() -> None:
        with torch.autograd.set_multithreading_enabled(False):
            torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)

    rows = {
        "step: flash_attn_func (eager path, no dispatcher)": grad(
            lambda *x: flash_attn_func(*x, causal=True), (q, k, v), dout
        ),
        "step: torch.ops.flexattn.fwd (its Autograd kernel)": grad(
            lambda *x: ops._FWD(*x, *causal)[0], (q, k, v), dout
        ),
        "step: flash_attn_func, autograd multithreading off": eager_step_single_thread,
        "step: compiled FlexAttention": grad(flex, qkv_t, dout_t),
        "step: SDPA": grad(lambda *x: sdpa(*x, is_causal=True), qkv_t, dout_t),
        "fwd: flash_attn_func, q/k/v require grad": lambda: flash_attn_func(q, k, v, causal=True),
        "fwd: torch.ops.flexattn.fwd, q/k/v require grad": lambda: ops._FWD(q, k, v, *causal),
        "fwd: triton_backend.fwd (launch only)": lambda: triton_backend.fwd(q.detach(), k.detach(), v.detach(), causal),
        "bwd: triton_backend.bwd (launches only)": lambda: triton_backend.bwd(
            dout, q.detach(), k.detach(), v.detach(), out, lse, causal, False
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(rounds):
        order = list(rows) if r % 2 == 0 else list(reversed(rows))
        for name in order:
            times[name].append(wall_us(rows[name], N))
    print(f"{'min':>8} {'median':>8}  us per call, {rounds} alternating rounds of {N} calls")
    for name, ts in times.items():
        print(f"{min(ts):8.1f} {statistics.median(ts):8.1f}  {name}")

    prof = cProfile.Profile()
    backward = ops._fwd_backward

    def profiled_backward(*args):
        prof.enable()
        try:
            return backward(*args)
        finally:
            prof.disable()

    ops._fwd_backward = profiled_backward
    wall_us(rows["step: flash_attn_func (eager path, no dispatcher)"], N)
    ops._fwd_backward = backward
    print("\n== cProfile of the eager path's backward (ops._fwd_backward), on autograd's worker thread")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
