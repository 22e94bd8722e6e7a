"""Where the host time of a fwd+bwd step through autograd goes, beyond the two ops' own cost.

On the H100 host (session 6) fwd+bwd through `torch.autograd.grad` took 913 us of host time while the fwd op
(q requires grad) and the bwd op alone took 178 + 202 us (host_overhead_parts.py). On CUDA tensors autograd
runs the backward on its per-device worker thread, where cProfile started on the main thread sees nothing,
so this script times the pieces from inside: the Autograd kernel of fwd on the caller's thread, and
`ops._fwd_backward` on whichever thread runs it, each with a cProfile of its own.

Usage (on the device): python benchmarks/host_overhead_autograd.py   (prints; no files)
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import threading
import time

os.environ.setdefault("FLEXATTN_BACKEND", "triton")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from profile_host_overhead import wall_us  # noqa: E402

from flexattn_ops import flash_attn_func, ops  # noqa: E402
from flexattn_ops.params import AttnArgs  # noqa: E402

N = 300


class _Timed:
    """Wraps ops._fwd_backward: total seconds inside, calls, the threads it ran on, a cProfile per thread."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds, self.calls, self.threads = fn, 0.0, 0, set()
        self.profiles: dict[int, cProfile.Profile] = {}
        self.profiling = False

    def __call__(self, *args, **kwargs):
        tid = threading.get_ident()
        self.threads.add(threading.current_thread().name if tid == threading.main_thread().ident else tid)
        prof = self.profiles.setdefault(tid, cProfile.Profile()) if self.profiling else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        try:
            return self.fn(*args, **kwargs)
        finally:
            if prof is not None:
                prof.disable()
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def main() -> None:
    dev, dt = os.environ.get("DEVICE", "cuda"), torch.bfloat16
    shape = (1, 128, 16, 128)
    q, k, v = (torch.randn(shape, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=dev, dtype=dt)
    timed = _Timed(ops._fwd_backward)
    ops._fwd_backward = timed

    def step() -> None:
        torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)

    def fwd_only() -> None:
        flash_attn_func(q, k, v, causal=True)

    causal = AttnArgs(softmax_scale=shape[-1] ** -0.5, window_right=0)
    qd, kd, vd = (x.detach() for x in (q, k, v))

    def by_hand() -> None:
        out, lse = ops._FWD(q, k, v, *causal)
        torch.ops.flexattn.bwd.default(dout, qd, kd, vd, out.detach(), lse, *causal, False)

    rows = {}
    rows["fwd (requires grad), flash_attn_func"] = wall_us(fwd_only, N)
    timed.seconds, timed.calls = 0.0, 0
    rows["fwd+bwd, autograd.grad"] = wall_us(step, N)
    rows["  of which in ops._fwd_backward"] = timed.seconds / timed.calls * 1e6
    with torch.autograd.set_multithreading_enabled(False):
        timed.seconds, timed.calls = 0.0, 0
        rows["fwd+bwd, autograd.grad, multithreading off"] = wall_us(step, N)
        rows["  of which in ops._fwd_backward (off)"] = timed.seconds / timed.calls * 1e6
    rows["fwd op + bwd op by hand (no autograd)"] = wall_us(by_hand, N)
    rows["fwd+bwd through the op's Autograd kernel, autograd.grad"] = wall_us(
        lambda: torch.autograd.grad(ops._FWD(q, k, v, *causal)[0], (q, k, v), dout), N
    )
    st = tuple(x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dout_t = dout.transpose(1, 2)
    rows["SDPA fwd+bwd, autograd.grad"] = wall_us(lambda: torch.autograd.grad(sdpa(*st, is_causal=True), st, dout_t))
    for name, us in rows.items():
        print(f"{us:8.1f} us  {name}")
    print("backward ran on threads:", timed.threads)

    timed.profiling = True
    for label, multithreading in (("autograd worker thread", True), ("caller thread", False)):
        timed.profiles.clear()
        with torch.autograd.set_multithreading_enabled(multithreading):
            wall_us(step, N)
        print(f"\n== cProfile of ops._fwd_backward, multithreading {'on' if multithreading else 'off'} ({label})")
        for prof in timed.profiles.values():
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
