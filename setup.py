"""Packaging lives in pyproject.toml; this file only adds the optional CUDA extension `flexattn_ops._C`.

A plain `pip install -e .` builds nothing and needs neither nvcc nor a CUDA torch. To compile the
SM90 kernels ahead of time (otherwise they are JIT-compiled on first use on an SM90 GPU):

    FLEXATTN_BUILD_CUDA=1 pip install -e . --no-build-isolation

`--no-build-isolation` lets the build see the installed torch (the extension must match it).
MAX_JOBS caps the parallel compiles; FLEXATTN_CUDA_KERNELS, FLEXATTN_CUDA_ARCHS and CUTLASS_PATH
are read by flexattn_ops/cuda_build.py, which holds the sources and flags.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _cuda_build():
    """flexattn_ops/cuda_build.py loaded by path: importing the package would import torch ops."""
    spec = importlib.util.spec_from_file_location("_flexattn_cuda_build", ROOT / "flexattn_ops" / "cuda_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _extension_kwargs() -> dict:
    if os.environ.get("FLEXATTN_BUILD_CUDA", "0") != "1":
        return {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        raise RuntimeError(
            "FLEXATTN_BUILD_CUDA=1 needs torch in the build environment: "
            "pip install -e . --no-build-isolation (with a CUDA build of torch installed)"
        ) from e
    cuda_build = _cuda_build()
    spec = cuda_build.build_spec(root=ROOT)
    cuda_build.nvcc_path(CUDA_HOME)
    ext = CUDAExtension(
        name=cuda_build.EXTENSION,
        sources=spec.relative_sources(),
        include_dirs=[str(p) for p in spec.include_dirs],
        extra_compile_args={"cxx": list(spec.cxx_flags), "nvcc": list(spec.nvcc_flags)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_kwargs())
