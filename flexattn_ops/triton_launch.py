"""Launching the Triton kernels with less host time.

``kernel[grid](*args, **kwargs)`` runs ``JITFunction.run`` on every call: it binds ~60-85 arguments, computes
their specialisation and a cache key, and only then calls the compiled kernel's C launcher. On the lent H100's
host that was 37 us of a 16 us launch for the forward and 67 of 18 for the one-launch backward
(benchmarks/launch_overhead.py, results/launch_overhead_h100_s8.log). `launch` does the same launch, and
after the first call with a given key it calls the compiled kernel directly (``CompiledKernel[grid]``, the
launcher ``JITFunction.run`` ends with, the same in Triton 3.6 and 3.9). Measured on the H100's host, the whole
``triton_backend.fwd`` went from 73.7 to 55.3 us and ``bwd`` (two launches) from 123.9 to 110.2 us
(results/launch_overhead_cache_h100_s8.log): building the key costs ~6 us for 85 arguments.

The key is at least as fine as Triton's specialisation: every scalar argument's type and value, except
that a parameter Triton does not specialise (``do_not_specialize``: sequence lengths, windows) contributes
only its integer type (i32, i64 or u64), so varlen batches of new lengths reuse their kernels; every
tensor's dtype and address modulo 16 (Triton specialises pointers on 16-byte alignment); the keyword
arguments (constexprs and launch options); the current device; and the Triton settings ``JITFunction.run``
folds into its own key (debug, instrumentation mode: the proton profiler switches it). Two calls with equal
keys therefore run the same compiled kernel under Triton too (tests/test_triton_launch.py checks the key against
the installed Triton's own specialisation function). Kernels with pre-run hooks, and the
interpreter (TRITON_INTERPRET=1), take ``kernel[grid]`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from triton import knobs

from flexattn_ops import triton_tuning as tuning

# key -> (compiled kernel, the arguments after the positional ones in signature order). A miss costs the key
# (~6 us) and one JITFunction.run; the limit (~6 MB of keys) bounds the cache when shapes keep changing.
_compiled: dict[tuple, tuple[Any, tuple]] = {}
_MAX_ENTRIES = 1024
_MAX_ENTRIES_PER_LAUNCH = 64  # a Launch's kernels differ only by their tensors' alignments
_unspecialized: dict[Any, tuple[int, ...]] = {}  # kernel -> positions of its do_not_specialize parameters


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.jit`` kernel: positional runtime arguments, constexprs
    and launch options (num_warps, num_stages) by keyword."""
    _launch(kernel, grid, args, kwargs)


def _launch(kernel: Any, grid: tuple[int, ...], args: tuple, kwargs: dict) -> Optional[tuple[Any, tuple]]:
    """`launch`; returns what it keeps for the call's key (None where it keeps nothing)."""
    if tuning.interpreting() or kernel.pre_run_hooks:
        kernel[grid](*args, **kwargs)
        return None
    key = _key(kernel, args, kwargs)
    hit = _compiled.get(key)
    if hit is not None:
        compiled, tail = hit
        compiled[(*grid, 1, 1)[:3]](*args, *tail)
        return hit
    hit = _launch_and_keep(kernel, grid, args, kwargs)
    if hit is not None:
        if len(_compiled) >= _MAX_ENTRIES:
            _compiled.clear()
        _compiled[key] = hit
    return hit


def _launch_and_keep(kernel: Any, grid: tuple[int, ...], args: tuple, kwargs: dict) -> Optional[tuple[Any, tuple]]:
    """``kernel[grid](*args, **kwargs)``; then (the compiled kernel, the arguments after `args`) to launch it
    directly next time, or None where the call cannot be keyed."""
    compiled = kernel[grid](*args, **kwargs)
    if compiled is None or not _cacheable(args, kwargs):
        return None
    if hasattr(compiled, "result"):  # Triton 3.9's async compile mode returns a future
        compiled = compiled.result()
    return compiled, _tail(kernel, len(args), kwargs)


class Launch:
    """One launch with its per-call tensors left out, as a plan keeps it for the next call with the same
    signature (triton_backend._planned): ``kernel[grid](*[tensors[i] for i in picks], *args, **kwargs)``.

    Its scalar arguments and keywords never change, and a signature fixes its tensors' dtypes, so of
    `launch`'s key only the tensors' addresses mod 16, the current device and Triton's settings remain: `run`
    keys its compiled kernels by those alone (~1 us against ~6 for `_key` over 85 arguments)."""

    __slots__ = ("kernel", "grid", "picks", "args", "kwargs", "compiled")

    def __init__(self, kernel: Any, grid: tuple[int, ...], picks: tuple[int, ...], args: tuple, kwargs: dict):
        self.kernel, self.grid, self.picks, self.args, self.kwargs = kernel, (*grid, 1, 1)[:3], picks, args, kwargs
        self.compiled: dict[tuple, tuple[Any, tuple]] = {}


def run(plan: Sequence[Launch], tensors: Sequence[Tensor]) -> None:
    """Every launch of `plan`, in order, on this call's `tensors` (which must have the dtypes of the tensors
    the plan was made for)."""
    direct = not tuning.interpreting()
    for step in plan:
        picked = [tensors[i] for i in step.picks]
        key = None
        if direct and not step.kernel.pre_run_hooks:
            key = (torch.cuda.current_device(), _triton_settings(), *[t.data_ptr() & 15 for t in picked])
            hit = step.compiled.get(key)
            if hit is not None:
                hit[0][step.grid](*picked, *step.args, *hit[1])
                continue
        # `launch`'s path: the interpreter and pre-run hooks bypass it; a new plan (varlen: a new max_seqlen)
        # finds there the kernel an equal launch compiled
        hit = _launch(step.kernel, step.grid, (*picked, *step.args), step.kwargs)
        if key is not None and hit is not None:
            if len(step.compiled) >= _MAX_ENTRIES_PER_LAUNCH:
                step.compiled.clear()
            step.compiled[key] = hit


def _key(kernel: Any, args: tuple, kwargs: dict) -> tuple:
    """The cache key of a call (what it holds and why: the module docstring)."""
    positions = _unspecialized.get(kernel)
    if positions is None:
        positions = _unspecialized[kernel] = tuple(i for i, p in enumerate(kernel.params) if p.do_not_specialize)
    values = list(args)
    for i in positions:
        if i < len(values) and values[i].__class__ is int:  # Triton types it by its range only
            values[i] = (int, -(2**31) <= values[i] < 2**31, values[i] >= 2**63)
    return (
        kernel,
        torch.cuda.current_device(),
        _triton_settings(),
        tuple(kwargs.items()),
        *[(x.dtype, x.data_ptr() & 15) if isinstance(x, Tensor) else (x.__class__, x) for x in values],
    )


def _triton_settings() -> tuple:
    """What JITFunction.run adds to its compile options on every call (the last two exist in Triton 3.9)."""
    return (
        knobs.runtime.debug,
        knobs.compilation.instrumentation_mode,
        getattr(knobs.compilation, "fpsan_homomorphic_casts", None),
        getattr(knobs.runtime, "add_stages_inspection_hook", None),
    )


def _cacheable(args: tuple, kwargs: dict) -> bool:
    """Tensors only as positional torch.Tensors: the key then holds their dtype and alignment, not the tensor
    (a keyword tensor or another object with a data pointer would be kept alive by the key)."""
    return not any(hasattr(v, "data_ptr") for v in kwargs.values()) and all(
        isinstance(x, Tensor) or not hasattr(x, "data_ptr") for x in args
    )


def _tail(kernel: Any, n_positional: int, kwargs: dict) -> tuple:
    """The values JITFunction.run passes for the parameters after the positional arguments: keywords, else
    defaults (the compiled launcher takes every parameter, constexprs included, in signature order)."""
    params = list(kernel.signature.parameters.values())[n_positional:]
    return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)
