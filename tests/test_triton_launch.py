"""triton_launch.launch's cache of compiled kernels, with a stand-in kernel (CI has no GPU): which calls reuse
the kernel compiled for an earlier one, and what the direct launch is handed. tests/test_triton_gpu.py runs
the real kernels through it."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
import triton.language as tl
from triton import knobs

from flexattn_ops import triton_launch


def _signature(Ptr, n, length, scale, BLOCK: tl.constexpr = 16, FLAG: tl.constexpr = False):  # noqa: N803
    """The parameters of the stand-in kernel; `length` is do_not_specialize."""


class FakeKernel:
    """kernel[grid](...) "compiles" (counted) and returns a compiled kernel whose [grid](...) records launches."""

    signature = inspect.signature(_signature)
    params = [SimpleNamespace(do_not_specialize=name == "length") for name in signature.parameters]

    def __init__(self) -> None:
        self.compiles = 0
        self.launches: list[tuple] = []
        self.pre_run_hooks: list = []
        self.future = False

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiles += 1
            self.launches.append(("run", grid, args, kwargs))
            return FakeFuture(FakeCompiled(self)) if self.future else FakeCompiled(self)

        return run


class FakeCompiled:
    def __init__(self, owner: FakeKernel) -> None:
        self.owner = owner

    def __getitem__(self, grid):
        return lambda *args: self.owner.launches.append(("direct", grid, args))


class FakeFuture:
    """What Triton 3.9's JITFunction.run returns in async compile mode: not subscriptable."""

    def __init__(self, compiled: FakeCompiled) -> None:
        self._compiled = compiled

    def result(self) -> FakeCompiled:
        return self._compiled


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
    triton_launch.launch(kernel, (3,), t, 5, 100, 0.5, BLOCK=32, num_warps=4)
    triton_launch.launch(kernel, (7, 2), t, 5, 100, 0.5, BLOCK=32, num_warps=4)
    assert kernel.compiles == 1
    # every parameter, constexprs included (FLAG from its default), and the grid padded to three dims
    assert kernel.launches[1] == ("direct", (7, 2, 1), (t, 5, 100, 0.5, 32, False))


def test_other_tensors_at_the_same_alignment_reuse_the_kernel(kernel: FakeKernel) -> None:
    a, b = _buf(), _buf()
    assert a.data_ptr() % 16 == b.data_ptr() % 16 == 0 and a.data_ptr() != b.data_ptr()
    triton_launch.launch(kernel, (1,), a, 5, 100, 0.5)
    triton_launch.launch(kernel, (1,), b, 5, 100, 0.5)
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
        "unspecialized_int_type",
        "debug",
        "instrumentation",
    ],
)
def test_calls_triton_could_compile_apart_miss(kernel: FakeKernel, change: str, monkeypatch) -> None:
    """Whatever Triton specialises on (pointer alignment to 16 bytes, dtype, int values 1 and multiples of 16,
    int vs float, an unspecialised int's type, constexprs, options, the device, debug and instrumentation
    settings) gives another key, so such a call compiles its own kernel."""
    t = _buf()
    args, kwargs = [t, 16, 100, 1.0], {"BLOCK": 32, "num_warps": 4}
    triton_launch.launch(kernel, (1,), *args, **kwargs)
    if change == "misaligned_pointer":
        args[0] = t[1:]  # 2 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = t.view(torch.float16)
    elif change == "int_value":
        args[1] = 17
    elif change == "int_vs_float":
        args[3] = 1  # equal to 1.0 in Python, but Triton types it i32 (and specialises 1 as a constant)
    elif change == "bool_vs_int":
        args[3] = True  # True == 1.0 in Python; Triton types it u1
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "launch_option":
        kwargs["num_warps"] = 8
    elif change == "device":
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    elif change == "unspecialized_int_type":
        args[2] = 2**40  # i64 instead of i32
    elif change == "debug":
        monkeypatch.setattr(knobs.runtime, "debug", True)
    elif change == "instrumentation":  # what the proton profiler switches on and off
        monkeypatch.setattr(knobs.compilation, "instrumentation_mode", "consumer")
    triton_launch.launch(kernel, (1,), *args, **kwargs)
    assert kernel.compiles == 2
    assert [x[0] for x in kernel.launches] == ["run", "run"]


def test_full_cache_starts_over(kernel: FakeKernel, monkeypatch) -> None:
    monkeypatch.setattr(triton_launch, "_MAX_ENTRIES", 2)
    t = _buf()
    for n in (1, 2, 3):
        triton_launch.launch(kernel, (1,), t, n + 16, 100, 0.5)
    assert len(triton_launch._compiled) == 1  # cleared when the third entry came
    triton_launch.launch(kernel, (1,), t, 19, 100, 0.5)
    assert kernel.compiles == 3


def test_interpreter_calls_the_kernel(kernel: FakeKernel, monkeypatch) -> None:
    monkeypatch.setattr(triton_launch.tuning, "interpreting", lambda: True)
    t = _buf()
    for _ in range(2):
        triton_launch.launch(kernel, (1,), t, 5, 100, 0.5)
    assert kernel.compiles == 2 and not triton_launch._compiled


def test_unspecialized_int_values_share_the_kernel(kernel: FakeKernel) -> None:
    """do_not_specialize parameters (sequence lengths) key by their int type only: varlen batches of new
    lengths reuse the kernel, and the launch gets the new value."""
    t = _buf()
    for length in (100, 3000, 1):
        triton_launch.launch(kernel, (1,), t, 5, length, 0.5)
    assert kernel.compiles == 1
    assert kernel.launches[-1] == ("direct", (1, 1, 1), (t, 5, 1, 0.5, 16, False))


def test_pre_run_hooks_and_keyword_tensors_are_not_cached(kernel: FakeKernel) -> None:
    t = _buf()
    for _ in range(2):
        triton_launch.launch(kernel, (1,), t, 5, 100, 0.5, Extra=t)  # the key must not hold a tensor
    kernel.pre_run_hooks.append(lambda *args, **kwargs: None)
    for _ in range(2):
        triton_launch.launch(kernel, (1,), t, 5, 100, 0.5)
    assert kernel.compiles == 4 and not triton_launch._compiled


def test_async_compile_future_is_resolved(kernel: FakeKernel) -> None:
    kernel.future = True
    t = _buf()
    for _ in range(2):
        triton_launch.launch(kernel, (1,), t, 5, 100, 0.5)
    assert kernel.compiles == 1 and kernel.launches[-1][0] == "direct"


@pytest.mark.parametrize("specialize", [True, False], ids=["specialized", "do_not_specialize"])
def test_equal_keys_specialise_alike_under_triton(specialize: bool, monkeypatch) -> None:
    """Against Triton's own specialisation of one argument (the installed Triton's native function): any two
    values whose keys are equal get the same type and specialisation, for a specialised parameter and for a
    do_not_specialize one."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "_unspecialized", {})
    kernel = FakeKernel()  # hashable; only its first parameter's do_not_specialize matters here
    kernel.params = [SimpleNamespace(do_not_specialize=not specialize)]
    t = _buf()
    values = [0, 1, 2, 15, 16, 17, 32, -16, -(2**31), 2**31 - 1, 2**31, 2**40, 2**63, True, False, 0.0, 1.0, 16.0]
    values += [t, t[1:], t[8:], t.view(torch.float16), t.float(), _buf()]
    for a in values:
        for b in values:
            if triton_launch._key(kernel, (a,), {}) == triton_launch._key(kernel, (b,), {}):
                spec_a = native_specialize_impl(BaseBackend, a, False, specialize, True)
                spec_b = native_specialize_impl(BaseBackend, b, False, specialize, True)
                assert spec_a == spec_b, (a, b)


def test_plan_launch_keys_by_alignment_device_and_settings(kernel: FakeKernel, monkeypatch) -> None:
    """A plan's Launch replays its kernel directly for other tensors at the same alignment; a misaligned tensor,
    another device or debug mode gets its own kernel; a new Launch equal to an old one (a new plan) reuses the
    kernel `launch` keeps."""
    step = triton_launch.Launch(kernel, (2,), (1,), (5, 100, 0.5), {"BLOCK": 32})
    a, b = _buf(), _buf()
    triton_launch.run([step], [b, a])
    triton_launch.run([step], [a, b])
    assert kernel.compiles == 1
    assert kernel.launches[-1] == ("direct", (2, 1, 1), (b, 5, 100, 0.5, 32, False))
    triton_launch.run([step], [a, a[1:]])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    triton_launch.run([step], [a, a])
    monkeypatch.setattr(knobs.runtime, "debug", True)
    triton_launch.run([step], [a, a])
    assert kernel.compiles == 4
    monkeypatch.setattr(knobs.runtime, "debug", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    again = triton_launch.Launch(kernel, (2,), (1,), (5, 100, 0.5), {"BLOCK": 32})
    triton_launch.run([again], [a, a])
    assert kernel.compiles == 4 and kernel.launches[-1][0] == "direct"


def test_plan_launch_in_the_interpreter_calls_the_kernel(kernel: FakeKernel, monkeypatch) -> None:
    monkeypatch.setattr(triton_launch.tuning, "interpreting", lambda: True)
    step = triton_launch.Launch(kernel, (2,), (0,), (5, 100, 0.5), {})
    for _ in range(2):
        triton_launch.run([step], [_buf()])
    assert kernel.compiles == 2 and not step.compiled
