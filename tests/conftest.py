"""Shared test set-up: fresh random seeds, an isolated Inductor cache, and input factories."""

from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch

# TRITON_INTERPRET is read when triton.language is first imported (its own @jit helpers such as
# tl.zeros / tl.sum become interpreted functions only then), and torch.compile tests import triton
# early. So on a machine without CUDA, turn the interpreter on here, before any test module loads,
# or the Triton CPU tests (test_triton*.py) fail depending on collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Each run draws fresh inputs; the seed is printed so a failure can be replayed with
# FLEXATTN_TEST_SEED=<seed>.
SEED = int(os.environ.get("FLEXATTN_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"flexattn_ops test seed: {SEED} (replay with FLEXATTN_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + hash(request.node.nodeid) % 100_000)


@pytest.fixture
def inductor_cache(tmp_path, monkeypatch):
    """A fresh TORCHINDUCTOR_CACHE_DIR: the Inductor cache does not notice changes to our fakes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield tmp_path
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Tests choose backends explicitly; a FLEXATTN_BACKEND from the shell must not leak in."""
    monkeypatch.delenv("FLEXATTN_BACKEND", raising=False)


@contextlib.contextmanager
def _poisoned_memory(warn_only: bool = False):
    """Fresh tensors filled with NaN (deterministic mode) while inside, so an output element a kernel
    forgets to write fails the comparison with the oracle."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture
def triton_backend_poisoned(monkeypatch):
    """FLEXATTN_BACKEND=triton, outputs poisoned (`_poisoned_memory`)."""
    monkeypatch.setenv("FLEXATTN_BACKEND", "triton")
    with _poisoned_memory():
        yield


@pytest.fixture
def cuda_backend_poisoned(monkeypatch):
    """FLEXATTN_BACKEND=cuda, outputs poisoned. warn_only: strict deterministic mode would make the
    oracle's cuBLAS matmuls on the GPU raise (no CUBLAS_WORKSPACE_CONFIG); only the NaN fill is wanted."""
    monkeypatch.setenv("FLEXATTN_BACKEND", "cuda")
    with _poisoned_memory(warn_only=True):
        yield
