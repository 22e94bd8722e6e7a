"""The one place that loads the CUDA extension (the `flexattn_cuda::*` ops from csrc/).

`available()` returns None once the ops are registered, else why they are not; the first call
decides and the process keeps the answer. In order:

1. no CUDA device of compute capability 9.0 visible: not loaded (nothing CUDA is imported or built,
   so CPU-only machines and CI never compile);
2. `flexattn_ops._C` imports (built by `FLEXATTN_BUILD_CUDA=1 pip install ...`): use it;
3. `FLEXATTN_CUDA_JIT=0`: not built;
4. JIT-compile with `torch.utils.cpp_extension.load` into the cache folder of `cuda_build.cache_dir`
   (a rebuild only when a source, a flag or a version changes; torch's file lock in that folder
   makes concurrent processes wait for one build), then load it.

A failed build (no nvcc, no CUTLASS headers, a compile error) is a reason, not an exception:
`FLEXATTN_BACKEND=auto` falls back to Triton and `explain_backend` shows it, while
`FLEXATTN_BACKEND=cuda` raises with it (dispatch).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import time
from typing import Optional

import torch

from flexattn_ops import cuda_build

JIT_ENV = "FLEXATTN_CUDA_JIT"
_MAX_REASON = 3000  # characters of a compiler error kept in the reason


@functools.cache
def installed() -> bool:
    """Whether the install build `flexattn_ops._C` is present (found, not imported: cheap, no CUDA)."""
    return importlib.util.find_spec(cuda_build.EXTENSION) is not None


def describe() -> str:
    """How the extension would be obtained here, without loading or building anything."""
    if installed():
        return f"the CUDA extension {cuda_build.EXTENSION} is installed (SM90 kernels)"
    if os.environ.get(JIT_ENV, "1") == "0":
        return f"the CUDA extension {cuda_build.EXTENSION} is not built and {JIT_ENV}=0"
    return f"the CUDA extension {cuda_build.EXTENSION} is not built; it compiles on first use on an SM90 GPU"


def _sm90_present() -> bool:
    return torch.cuda.is_available() and any(
        torch.cuda.get_device_capability(i) == (9, 0) for i in range(torch.cuda.device_count())
    )


def _registered() -> bool:
    return hasattr(torch.ops, "flexattn_cuda") and hasattr(torch.ops.flexattn_cuda, "fwd_sm90")


@functools.cache
def available() -> Optional[str]:
    """None when `torch.ops.flexattn_cuda.fwd_sm90` is ready, else why not (decided once per process)."""
    if not _sm90_present():
        return "no SM90 (compute capability 9.0) GPU visible: the CUDA extension is neither loaded nor built"
    import_error = None
    if installed():
        try:
            importlib.import_module(cuda_build.EXTENSION)
        except ImportError as e:  # e.g. built against another torch: try the JIT build instead
            import_error = f"{cuda_build.EXTENSION} failed to import ({e})"
    if import_error is None and _registered():
        return None
    if os.environ.get(JIT_ENV, "1") == "0":
        return f"{import_error or f'{cuda_build.EXTENSION} is not built'}; {JIT_ENV}=0 turns off the JIT build"
    try:
        _jit_build()
    except Exception as e:  # any failure (no nvcc/CUTLASS/ninja, a compile error) is a reason, never a crash
        text = str(e).strip()
        if len(text) > _MAX_REASON:
            text = "..." + text[-_MAX_REASON:]
        return f"building the CUDA extension failed: {text}"
    if not _registered():
        return "the CUDA extension loaded but registers no flexattn_cuda::fwd_sm90"
    return None


def _jit_build() -> None:
    """Compile (or reuse from the cache) and load the extension; raises with the reason on failure."""
    from torch.utils import cpp_extension

    import flexattn_ops

    spec = cuda_build.build_spec()
    cuda_build.nvcc_path(cpp_extension.CUDA_HOME)
    folder = cuda_build.cache_dir(spec, flexattn_ops.__version__, torch.__version__, torch.version.cuda)
    folder.mkdir(parents=True, exist_ok=True)
    fresh = not (folder / f"{cuda_build.JIT_NAME}.so").exists()
    if fresh:
        print(cuda_build.build_notice(spec, folder, cuda_build.build_jobs()), file=sys.stderr, flush=True)
    start = time.monotonic()
    cpp_extension.load(
        name=cuda_build.JIT_NAME,
        sources=[str(p) for p in spec.sources],
        extra_cflags=list(spec.cxx_flags),
        extra_cuda_cflags=list(spec.nvcc_flags),
        extra_include_paths=[str(p) for p in spec.include_dirs],
        build_directory=str(folder),
        is_python_module=False,
    )
    if fresh:
        print(f"flexattn_ops: built the CUDA extension in {time.monotonic() - start:.0f} s", file=sys.stderr)


@functools.cache
def kernels() -> frozenset[cuda_build.Kernel]:
    """The compiled forward instantiations (empty when the extension is not available)."""
    if available() is not None:
        return frozenset()
    return frozenset(cuda_build.Kernel.parse(n) for n in torch.ops.flexattn_cuda.fwd_sm90_kernels())
