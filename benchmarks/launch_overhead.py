"""Where the host time of one Triton launch goes, for each launch of our fwd and bwd on a tiny causal shape
(b=1, s=128, h=16, d=128: microseconds of GPU work, so the host is what is timed).

`JITFunction.run` is split into the parts it runs on every call: the binder (the generated function that binds
the arguments and computes their specialisation), the cache key, `launch_metadata`, and the compiled kernel's
C launcher. "direct" is `CompiledKernel[grid](*args)` with everything bound already: what a launch costs once
the kernel is known (what `triton_launch` does after its first call). Also the whole `triton_backend.fwd` /
`bwd` (launches plus their Python and allocations) from a kept plan (triton_backend._planned), and with the
plans cleared before every call (arguments assembled, kernels launched through `kernel[grid]`), alternating.

Usage (on the device): python benchmarks/launch_overhead.py   (prints; no files)
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, compute_cache_key

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flexattn_ops import triton_backend  # noqa: E402
from flexattn_ops.params import AttnArgs  # noqa: E402

N = 3000


def us_per_call(fn) -> float:
    """Minimum over 5 repeats of the mean wall time of N calls (one synchronisation after each repeat)."""
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / N * 1e6)
    return best


def run_kwargs(fn: JITFunction, kwargs: dict) -> dict:
    """The keyword arguments `run` hands the binder (it adds these before binding)."""
    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton 3.9
        kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kw


def split_launch(fn: JITFunction, args: tuple, grid: tuple, kwargs: dict, device: int, stream: int) -> str:
    """One line: `fn[grid](*args, **kwargs)` timed whole and in its parts."""
    kernel_cache, key_cache, _, _, binder = fn.device_caches[device]
    kw = run_kwargs(fn, kwargs)
    bound, spec, options = binder(*args, **kw)
    kernel = kernel_cache[compute_cache_key(key_cache, spec, options)]
    values = tuple(bound.values())
    g = (*grid, 1, 1)[:3]
    launcher = kernel[g]
    whole = us_per_call(lambda: fn[grid](*args, **kwargs))
    bind = us_per_call(lambda: binder(*args, **kw))
    key = us_per_call(lambda: compute_cache_key(key_cache, spec, options))
    meta = us_per_call(lambda: kernel.launch_metadata(g, stream, *values))
    direct = us_per_call(lambda: launcher(*values, stream=stream))
    name = fn.__name__ + (f"[{kwargs['PART']}]" if "PART" in kwargs else "")
    other = whole - bind - key - meta - direct
    return (
        f"{name:28s} {len(values)} args: run {whole:6.1f} us = binder {bind:5.1f} + key {key:5.1f}"
        f" + launch_metadata {meta:4.1f} + direct launch {direct:5.1f} + other {other:5.1f}"
    )


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    q, k, v = (torch.randn(1, 128, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = AttnArgs(softmax_scale=1.0 / math.sqrt(128), window_right=0)
    out, lse = triton_backend.fwd(q, k, v, a)
    dout = torch.randn_like(out)
    triton_backend.bwd(dout, q, k, v, out, lse, a, False)

    captured = []
    real_run = JITFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        captured.append((self, args, grid, dict(kwargs)))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = spy
    triton_backend._plans.clear()  # new plans: their first launches go through JITFunction.run
    triton_backend.fwd(q, k, v, a)
    triton_backend.bwd(dout, q, k, v, out, lse, a, False)
    JITFunction.run = real_run

    def unplanned(call):  # the arguments assembled and kernel[grid] launched on every call, as before plans
        def run():
            triton_backend._plans.clear()
            call()

        return run

    # whole fwd / bwd (launches, their Python and allocations), from kept plans and without, alternating
    calls = {
        "fwd": lambda: triton_backend.fwd(q, k, v, a),
        "bwd": lambda: triton_backend.bwd(dout, q, k, v, out, lse, a, False),
    }
    best: dict[tuple[str, str], float] = {}
    for _ in range(3):
        for name, call in calls.items():
            for how, fn in (("no plan", unplanned(call)), ("plan", call)):
                best[name, how] = min(best.get((name, how), float("inf")), us_per_call(fn))
    for name in calls:
        print(
            f"triton_backend.{name} whole: {best[name, 'no plan']:.1f} us assembling and launching with "
            f"kernel[grid] every call, {best[name, 'plan']:.1f} us from the kept plan"
        )
    print(f"torch.empty_like(q): {us_per_call(lambda: torch.empty_like(q)):.1f} us")
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    for fn, args, grid, kwargs in captured:
        print(split_launch(fn, args, grid, kwargs, device, stream), flush=True)


if __name__ == "__main__":
    main()
