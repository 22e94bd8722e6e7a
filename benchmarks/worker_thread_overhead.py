"""Why a fwd+bwd step costs more host time with autograd's CUDA worker thread than without it.

On CUDA tensors autograd runs the backward on its per-device worker thread; with multithreading off it runs
on the caller's thread. On the tiny causal shape of host_overhead_autograd.py (GPU work of microseconds),
for each mode this times, per step (microseconds, mean over N steps, R alternating rounds, min and median):
- the step's wall time;
- the hand-over: from `torch.autograd.grad`'s call to our backward's entry, and from its exit to grad's return;
- inside our backward (`ops._fwd_backward`): wall time and the thread's CPU time (wall >> CPU: it waits);
- the parts of it: `triton_backend._signature` (a plan's key), `triton_launch.run`, `dispatch.select`;
- probes run at the backward's entry: a fixed pure-Python loop, 20 `torch.cuda.current_device()` calls and
  4 `torch.empty_like(q)`: the same work on either thread, so they tell "any Python is slower there" from
  "something of ours is".

Usage (on the device): python benchmarks/worker_thread_overhead.py [--rounds 5]   (prints; no files)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable

os.environ.setdefault("FLEXATTN_BACKEND", "triton")

import torch  # noqa: E402

from flexattn_ops import dispatch, flash_attn_func, ops, triton_backend, triton_launch  # noqa: E402

N = 200
_acc: dict[str, float] = defaultdict(float)
_marks: dict[str, float] = {}


def _timed(name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _acc[name] += time.perf_counter() - t0

    return wrapper


def _probes(q: torch.Tensor) -> None:
    t0 = time.perf_counter()
    total = 0
    for i in range(300):
        total += i * i
    t1 = time.perf_counter()
    for _ in range(20):
        torch.cuda.current_device()
    t2 = time.perf_counter()
    for _ in range(4):
        torch.empty_like(q)
    t3 = time.perf_counter()
    _acc["probe: python loop"] += t1 - t0
    _acc["probe: 20 current_device"] += t2 - t1
    _acc["probe: 4 empty_like"] += t3 - t2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    shape = (1, 128, 16, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    backward = ops._fwd_backward

    def instrumented_backward(ctx, *args):
        _acc["hand-over in"] += time.perf_counter() - _marks["grad_called"]
        _probes(q)
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return backward(ctx, *args)
        finally:
            _acc["inside backward: wall"] += time.perf_counter() - t0
            _acc["inside backward: thread CPU"] += time.thread_time() - c0
            _marks["backward_left"] = time.perf_counter()

    ops._fwd_backward = instrumented_backward
    triton_backend._signature = _timed("  triton_backend._signature", triton_backend._signature)
    triton_launch.run = _timed("  triton_launch.run", triton_launch.run)
    dispatch.select = _timed("  dispatch.select", dispatch.select)

    def step() -> None:
        out = flash_attn_func(q, k, v, causal=True)
        _marks["grad_called"] = time.perf_counter()
        torch.autograd.grad(out, (q, k, v), dout)
        _acc["hand-over out"] += time.perf_counter() - _marks["backward_left"]

    results: dict[str, dict[str, list[float]]] = {
        "worker thread": defaultdict(list),
        "caller's thread": defaultdict(list),
    }
    for r in range(rounds):
        modes = [True, False] if r % 2 == 0 else [False, True]
        for multithreaded in modes:
            name = "worker thread" if multithreaded else "caller's thread"
            with torch.autograd.set_multithreading_enabled(multithreaded):
                for _ in range(20):
                    step()
                torch.cuda.synchronize()
                _acc.clear()
                t0 = time.perf_counter()
                for _ in range(N):
                    step()
                torch.cuda.synchronize()
                results[name]["step (wall)"].append((time.perf_counter() - t0) / N * 1e6)
                for part, total in _acc.items():
                    results[name][part].append(total / N * 1e6)
    names = list(results["worker thread"])
    print(f"us per step, min / median of {rounds} alternating rounds of {N} steps")
    print(f"{'':34} {'worker thread':>17} {'caller thread':>17}")
    for part in names:
        cells = [results[m][part] for m in results]
        print(f"{part:34} " + " ".join(f"{min(c):7.1f} / {statistics.median(c):7.1f}" for c in cells))
    print("Python threads:", [t.name for t in threading.enumerate()], "switch interval", sys.getswitchinterval())
    print(torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
