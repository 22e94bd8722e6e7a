"""triton_launch.launch's cache of compiled kernels, with a stand-in kernel (CI has no GPU): which calls reuse
the kernel compiled for an earlier one, and what the direct launch is handed. tests/test_triton_gpu.py runs
the real kernels through it."""

from __future__ import annotations

import inspect

import pytest
import torch
import triton.language as tl

from flexattn_ops import triton_launch


def _signature(Ptr, n, scale, BLOCK: tl.constexpr = 16, FLAG: tl.constexpr = False):  # noqa: N803
    """The parameters of the stand-in kernel."""


class FakeKernel:
    """kernel[grid](...) "compiles" (counted) and returns a compiled kernel whose [grid](...) records launches."""

    signature = inspect.signature(_signature)

    def __init__(self) -> None:
        self.compiles = 0
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiles += 1
            self.launches.append(("run", grid, args, kwargs))
            return FakeCompiled(self)

        return run


class FakeCompiled:
    def __init__(self, owner: FakeKernel) -> None:
        self.owner = owner

    def __getitem__(self, grid):
        return lambda *args: self.owner.launches.append(("direct", grid, args))


@pytest.fixture
def kernel(monkeypatch) -> FakeKernel:
    monkeypatch.setattr(triton_launch.tuning, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "_compiled", {})
    return FakeKernel()


def _buf(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(64).to(dtype)


def test_repeat_launches_directly_with_constexprs_in_signature_order(kernel: FakeKernel) -> None:
    t = _buf()
    triton_launch.launch(kernel, (3,), t, 5, 0.5, BLOCK=32, num_warps=4)
    triton_launch.launch(kernel, (7, 2), t, 5, 0.5, BLOCK=32, num_warps=4)
    assert kernel.compiles == 1
    # every parameter, constexprs included (FLAG from its default), and the grid padded to three dims
    assert kernel.launches[1] == ("direct", (7, 2, 1), (t, 5, 0.5, 32, False))


def test_other_tensors_at_the_same_alignment_reuse_the_kernel(kernel: FakeKernel) -> None:
    a, b = _buf(), _buf()
    assert a.data_ptr() % 16 == b.data_ptr() % 16 == 0 and a.data_ptr() != b.data_ptr()
    triton_launch.launch(kernel, (1,), a, 5, 0.5)
    triton_launch.launch(kernel, (1,), b, 5, 0.5)
    assert kernel.compiles == 1


@pytest.mark.parametrize(
    "change",
    [
        "misaligned_pointer",
        "dtype",
        "int_value",
        "int_vs_float",
        "bool_vs_int",
        "constexpr",
        "launch_option",
        "device",
    ],
)
def test_calls_triton_could_compile_apart_miss(kernel: FakeKernel, change: str, monkeypatch) -> None:
    """Whatever Triton specialises on (pointer alignment to 16 bytes, dtype, int values 1 and multiples of 16,
    int vs float, constexprs, options, the device) gives another key, so such a call compiles its own kernel."""
    t = _buf()
    args, kwargs = [t, 16, 1.0], {"BLOCK": 32, "num_warps": 4}
    triton_launch.launch(kernel, (1,), *args, **kwargs)
    if change == "misaligned_pointer":
        args[0] = t[1:]  # 2 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = t.view(torch.float16)
    elif change == "int_value":
        args[1] = 17
    elif change == "int_vs_float":
        args[2] = 1  # equal to 1.0 in Python, but Triton types it i32 (and specialises 1 as a constant)
    elif change == "bool_vs_int":
        args[2] = True  # True == 1.0 in Python; Triton types it u1
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "launch_option":
        kwargs["num_warps"] = 8
    elif change == "device":
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    triton_launch.launch(kernel, (1,), *args, **kwargs)
    assert kernel.compiles == 2
    assert [x[0] for x in kernel.launches] == ["run", "run"]


def test_full_cache_starts_over(kernel: FakeKernel, monkeypatch) -> None:
    monkeypatch.setattr(triton_launch, "_MAX_ENTRIES", 2)
    t = _buf()
    for n in (1, 2, 3):
        triton_launch.launch(kernel, (1,), t, n + 16, 0.5)
    assert len(triton_launch._compiled) == 1  # cleared when the third entry came
    triton_launch.launch(kernel, (1,), t, 19, 0.5)
    assert kernel.compiles == 3


def test_interpreter_calls_the_kernel(kernel: FakeKernel, monkeypatch) -> None:
    monkeypatch.setattr(triton_launch.tuning, "interpreting", lambda: True)
    t = _buf()
    for _ in range(2):
        triton_launch.launch(kernel, (1,), t, 5, 0.5)
    assert kernel.compiles == 2 and not triton_launch._compiled
