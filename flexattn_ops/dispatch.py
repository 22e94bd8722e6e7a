"""The one place that chooses a backend.

`FLEXATTN_BACKEND=auto|cuda|triton|reference` (read at each call, default `auto`). `auto` takes
the first backend in `BACKENDS` that can run the inputs; a backend asked for by name that
cannot run them raises, saying why. `explain` reports the choice and every other backend's reason.

| backend   | module                         | runs on                                                    |
| --------- | ------------------------------ | ---------------------------------------------------------- |
| cuda      | `flexattn_ops.cuda_backend`    | SM90 GPUs: csrc/'s forward (`cuda_ext` loads or JIT-builds |
|           |                                | it); backward through Triton on the CUDA out/lse           |
| triton    | `flexattn_ops.triton_backend`  | CUDA GPUs; CPU tensors under TRITON_INTERPRET=1            |
| reference | `flexattn_ops.reference`       | any device (the CPU implementation)                        |

What each backend runs is its module's `unsupported(op, q, k, v, a)`; this module only adds the
device and installation checks, cheapest first (CPU tensors never touch CUDA or a build).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional

from torch import Tensor

from flexattn_ops import cuda_ext
from flexattn_ops.params import AttnArgs

BACKEND_ENV = "FLEXATTN_BACKEND"
# `auto` tries them in this order: compiled kernels first. It never picks the Triton interpreter
# for CPU tensors (it runs ~1000x slower than the reference backend there).
BACKENDS = ("cuda", "triton", "reference")
# Every op a backend module may implement (a function of that name). The reference runs them all;
# the other backends say in `unsupported(op, ...)` which ones they cannot run yet.
OPS = ("fwd", "bwd", "probs", "fwd_kvcache", "combine")


@dataclass
class BackendChoice:
    """`selected` runs the call; `reasons[name]` says why each other backend would not (None: it could)."""

    selected: str
    requested: str
    reasons: dict[str, Optional[str]] = field(default_factory=dict)


def requested_backend() -> str:
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}: expected one of auto, {', '.join(BACKENDS)}, got {name!r}")
    return name


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache  # import_module's own lookup costs ~2 us a call, and select calls this on every op call
def backend_module(name: str) -> ModuleType:
    """The module of backend `name` (it has a function per op it runs)."""
    return importlib.import_module(f"flexattn_ops.{name}_backend" if name != "reference" else "flexattn_ops.reference")


def why_not(name: str, op: str, q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> Optional[str]:
    """None if backend `name` can run `op` on these inputs, else the reason it cannot."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {', '.join(OPS)}")
    if name == "reference":
        return None
    if name == "cuda":
        if q.device.type != "cuda":
            return f"the CUDA backend runs on CUDA tensors, got {q.device.type} ({cuda_ext.describe()})"
        return backend_module("cuda").unsupported(op, q, k, v, a)  # loads the extension last
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if q.device.type != "cuda" and not (q.device.type == "cpu" and interpret):
            return f"Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {q.device.type}"
        if not _installed("triton"):
            return "triton is not installed"
        return backend_module("triton").unsupported(op, q, k, v, a)
    raise ValueError(f"unknown backend {name!r}")


def explain(op: str, q: Tensor, k: Tensor, v: Tensor, a: AttnArgs, *, complete: bool = True) -> BackendChoice:
    """Which backend runs `op` for these inputs, and why each of the others does not.

    With `complete=False` (what `select` uses on every call) only the backends the choice needs are
    asked: a backend named by FLEXATTN_BACKEND alone, or under `auto` those before the first that
    can run the inputs. Asking the `cuda` backend may build its extension, which a call that
    named Triton must never wait for.
    """
    requested = requested_backend()
    reasons: dict[str, Optional[str]] = {}

    def reason(name: str) -> Optional[str]:
        if name not in reasons:
            reasons[name] = why_not(name, op, q, k, v, a)
            if requested == "auto" and name == "triton" and q.device.type == "cpu":
                reasons[name] = reasons[name] or "auto keeps CPU tensors on the reference backend"
        return reasons[name]

    if requested != "auto":
        if reason(requested) is not None:
            raise RuntimeError(f"{BACKEND_ENV}={requested} cannot run {op}: {reasons[requested]}")
        selected = requested
    else:
        selected = next(name for name in BACKENDS if reason(name) is None)  # the reference runs everything
    if complete:
        for name in BACKENDS:
            reason(name)
    return BackendChoice(selected, requested, {name: reasons[name] for name in BACKENDS if name in reasons})


def select(op: str, q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> ModuleType:
    """The backend module that runs `op` (it has a function named `op`)."""
    return backend_module(explain(op, q, k, v, a, complete=False).selected)
