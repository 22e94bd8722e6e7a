"""Launching the Triton kernels with less host time.

``kernel[grid](*args, **kwargs)`` runs ``JITFunction.run`` on every call: it binds ~60-85 arguments, computes
their specialisation and a cache key, and only then calls the compiled kernel's C launcher. On the lent H100's
host that was 37 us of a 16 us launch for the forward and 67 of 18 for the one-launch backward
(benchmarks/launch_overhead.py, results/launch_overhead_h100_s8.log). `launch` does the same launch, and
after the first call with a given key it calls the compiled kernel directly (``CompiledKernel[grid]``, the
launcher ``JITFunction.run`` ends with, the same in Triton 3.6 and 3.9). Measured on the H100's host, the whole
``triton_backend.fwd`` went from 73.7 to 55.3 us and ``bwd`` (two launches) from 123.9 to 110.2 us
(results/launch_overhead_cache_h100_s8.log): building the key costs ~6 us for 85 arguments.

The key is finer than any specialisation Triton makes: every scalar argument's type and value, every
tensor's dtype and address modulo 16 (Triton specialises pointers on 16-byte alignment), the keyword
arguments (constexprs and launch options) and the current device. Two calls with equal keys therefore
run the same compiled kernel under Triton too. Under TRITON_INTERPRET=1 it is ``kernel[grid]`` itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flexattn_ops import triton_tuning as tuning

# key -> (compiled kernel, the arguments after the positional ones in signature order). A miss costs one
# JITFunction.run, as without the cache; the limit bounds it when shapes keep changing (varlen lengths).
_compiled: dict[tuple, tuple[Any, tuple]] = {}
_MAX_ENTRIES = 4096


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.jit`` kernel: positional runtime arguments, constexprs
    and launch options (num_warps, num_stages) by keyword."""
    if tuning.interpreting():
        kernel[grid](*args, **kwargs)
        return
    key = (
        kernel,
        torch.cuda.current_device(),
        tuple(kwargs.items()),
        *[(x.dtype, x.data_ptr() & 15) if isinstance(x, Tensor) else (x.__class__, x) for x in args],
    )
    hit = _compiled.get(key)
    if hit is not None:
        compiled, tail = hit
        compiled[(*grid, 1, 1)[:3]](*args, *tail)
        return
    compiled = kernel[grid](*args, **kwargs)
    if compiled is None:
        return
    if len(_compiled) >= _MAX_ENTRIES:
        _compiled.clear()
    _compiled[key] = (compiled, _tail(kernel, len(args), kwargs))


def _tail(kernel: Any, n_positional: int, kwargs: dict) -> tuple:
    """The values JITFunction.run passes for the parameters after the positional arguments: keywords, else
    defaults (the compiled launcher takes every parameter, constexprs included, in signature order)."""
    params = list(kernel.signature.parameters.values())[n_positional:]
    return tuple(kwargs[p.name] if p.name in kwargs else p.default for p in params)
