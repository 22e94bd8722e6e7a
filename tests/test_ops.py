"""`torch.library.opcheck` on every op: schema, fake vs real (strides too), autograd registration,
AOT dispatch with dynamic shapes. Contiguous, permuted-dense and sliced inputs, with and without
requires_grad."""

from __future__ import annotations

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import flexattn_ops  # noqa: F401  (registers the ops)
from flexattn_ops.params import AttnArgs
from tests.helpers import layouts, rand_qkv

LAYOUTS = ["contiguous", "permuted", "sliced"]
# On a GPU machine the same checks run on CUDA tensors, i.e. on the backend `auto` picks there.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def on(a: AttnArgs, device: str) -> AttnArgs:
    """The same arguments with every tensor moved to `device`."""
    return a._replace(**{f: t.to(device) for f, t in a._asdict().items() if isinstance(t, torch.Tensor)})


FEATURE_ARGS = {
    "plain": lambda b, hq, sq, sk: AttnArgs(softmax_scale=0.3),
    "causal_softcap": lambda b, hq, sq, sk: AttnArgs(softmax_scale=0.3, window_right=0, softcap=4.0),
    "window_alibi": lambda b, hq, sq, sk: AttnArgs(
        softmax_scale=0.3, window_left=3, window_right=2, alibi_slopes=torch.rand(b, hq)
    ),
    "bias_sinks": lambda b, hq, sq, sk: AttnArgs(
        softmax_scale=0.3, attn_bias=torch.randn(1, hq, sq, sk), sinks=torch.randn(hq)
    ),
    "dropout": lambda b, hq, sq, sk: AttnArgs(
        softmax_scale=0.3, dropout_p=0.2, rng_state=torch.tensor([7, 11], dtype=torch.int64)
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("feature", list(FEATURE_ARGS))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_fwd(device, layout, feature, requires_grad):
    b, sq, sk, hq = 2, 7, 11, 4
    q, k, v = (
        layouts(x, layout).requires_grad_(requires_grad)
        for x in rand_qkv(b, sq, sk, hq, 2, 1, 16, 24, torch.float32, device=device)
    )
    a = on(FEATURE_ARGS[feature](b, hq, sq, sk), device)
    if requires_grad and a.attn_bias is not None:
        a = a._replace(attn_bias=a.attn_bias.requires_grad_(), sinks=a.sinks.requires_grad_())
    torch.library.opcheck(torch.ops.flexattn.fwd.default, (q, k, v, *a))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("feature", list(FEATURE_ARGS))
def test_opcheck_bwd(device, layout, feature):
    b, sq, sk, hq = 2, 7, 11, 4
    q, k, v = (layouts(x, layout) for x in rand_qkv(b, sq, sk, hq, 2, 1, 16, 24, torch.float32, device=device))
    a = on(FEATURE_ARGS[feature](b, hq, sq, sk), device)
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    dout = layouts(torch.randn_like(out), layout)
    for bias_grad in (False, True):
        torch.library.opcheck(torch.ops.flexattn.bwd.default, (dout, q, k, v, out, lse, *a, bias_grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_probs(device, layout):
    q, k, v = (layouts(x, layout) for x in rand_qkv(2, 5, 9, 2, 1, 1, 8, 8, torch.float32, device=device))
    a = on(FEATURE_ARGS["dropout"](2, 2, 5, 9), device)
    torch.library.opcheck(torch.ops.flexattn.probs.default, (q, k, v, *a))


def test_fwd_output_strides_match_fake():
    """The fake's strides are what the kernels return (contiguous), for every input layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for layout in LAYOUTS:
        q, k, v = (layouts(x, layout) for x in rand_qkv(2, 5, 9, 4, 2, 2, 16, 8, torch.float32))
        a = AttnArgs(softmax_scale=0.25)
        out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
        with FakeTensorMode() as mode:
            fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
            fout, flse = torch.ops.flexattn.fwd(fq, fk, fv, *a)
        assert out.stride() == fout.stride() and lse.stride() == flse.stride(), layout
        assert out.is_contiguous() and lse.is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bwd_grad_strides_match_fake(layout, backend, monkeypatch):
    """Gradients come back in their input's layout (a permuted input's strides, so autograd accumulates them
    into .grad without a strided copy; contiguous for a sliced input), on every CPU backend, and the fake
    says so."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("FLEXATTN_BACKEND", backend)

    q, k, v = (layouts(x, layout) for x in rand_qkv(2, 5, 9, 4, 2, 2, 16, 8, torch.float32))
    a = AttnArgs(softmax_scale=0.25)
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    dout = torch.randn_like(out)
    grads = torch.ops.flexattn.bwd(dout, q, k, v, out, lse, *a, False)[:3]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in (dout, q, k, v, out, lse)]
        fake_grads = torch.ops.flexattn.bwd(*fake, *a, False)[:3]
    for grad, fake_grad, x in zip(grads, fake_grads, (q, k, v), strict=True):
        assert grad.stride() == fake_grad.stride() == torch.empty_like(x).stride(), layout
        assert grad.is_contiguous() == (layout != "permuted")


@pytest.mark.parametrize("entry", ["op", "flash_attn_func"])
def test_double_backward_raises(entry: str):
    """bwd has no derivative: differentiating the gradients of a create_graph=True backward raises instead
    of giving wrong second derivatives; the first-order gradients are right either way. flash_attn_func's
    eager path (no dispatcher) must raise too."""
    from flexattn_ops import flash_attn_func

    q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    if entry == "op":
        out, _ = torch.ops.flexattn.fwd(q, k, v, *AttnArgs(softmax_scale=0.3))
    else:
        out = flash_attn_func(q, k, v, softmax_scale=0.3)
    (dq2,) = torch.autograd.grad(out.sum(), q, create_graph=True, retain_graph=True)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq2.detach(), dq) and torch.isfinite(dq).all()
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(dq2.sum(), q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature", list(FEATURE_ARGS))
def test_eager_path_equals_op_path(device: str, feature: str, monkeypatch):
    """Unobserved eager calls (ops.attention_fwd, which flash_attn_func calls) skip the dispatcher and apply
    the implementations from Python; the op's own Autograd kernel must give bitwise the same outputs and
    gradients, bias and sinks gradients included. Counting calls shows which path each run took."""
    from flexattn_ops import ops

    calls = {"eager fwd": 0, "op bwd": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)

        return wrapper

    monkeypatch.setattr(ops, "_fwd_impl", counted("eager fwd", ops._fwd_impl))
    monkeypatch.setattr(ops, "_bwd_op", counted("op bwd", ops._bwd_op))
    b, sq, sk, hq = 2, 7, 11, 4
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (x.to(device, dtype) for x in rand_qkv(b, sq, sk, hq, 2, 2, 16, 8, torch.float32))
    a = on(FEATURE_ARGS[feature](b, hq, sq, sk), device)
    bias, sinks = (None if t is None else t.clone().requires_grad_() for t in (a.attn_bias, a.sinks))
    a = a._replace(attn_bias=bias, sinks=sinks)
    dout = torch.randn(b, sq, hq, 8, device=device, dtype=dtype)
    results = {}
    for path in ("eager", "op"):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, _ = ops.attention_fwd(*inputs, a) if path == "eager" else torch.ops.flexattn.fwd(*inputs, *a)
        wrt = inputs + [t for t in (bias, sinks) if t is not None]
        results[path] = (out, *torch.autograd.grad(out, wrt, dout))
    assert calls == {"eager fwd": 1, "op bwd": 1}, calls
    for got, want in zip(results["eager"], results["op"], strict=True):
        assert torch.equal(got, want)


class _Names:
    """A mode that records the name of every function or op it sees while active."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def _record(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


class _OpNames(_Names, TorchDispatchMode):
    __torch_dispatch__ = _Names._record


class _FunctionNames(_Names, TorchFunctionMode):
    __torch_function__ = _Names._record


@pytest.mark.parametrize("observer", ["dispatch mode", "torch-function mode", "dispatch mode in backward", "profiler"])
def test_observed_calls_take_the_ops(observer: str):
    """Modes (FakeTensorMode, FlopCounterMode, ...) and the profiler see torch.ops.flexattn.fwd and bwd as ops: the
    eager path steps aside for them, in the backward too when the observer starts after the forward."""
    from flexattn_ops import flash_attn_func

    q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    if observer == "profiler":
        with torch.profiler.profile() as prof:
            flash_attn_func(q, k, v, causal=True).sum().backward()
        names = {e.name.replace("::", ".") + ".default" for e in prof.events()}
        want = {"flexattn.fwd.default", "flexattn.bwd.default"}
    elif observer == "dispatch mode in backward":
        out = flash_attn_func(q, k, v, causal=True)
        with _OpNames() as mode:
            out.sum().backward()
        names, want = mode.names, {"flexattn.bwd.default"}
    else:
        with _OpNames() if observer == "dispatch mode" else _FunctionNames() as mode:
            flash_attn_func(q, k, v, causal=True).sum().backward()
        names = mode.names
        want = {"flexattn.fwd.default"} | ({"flexattn.bwd.default"} if observer == "dispatch mode" else set())
    assert want <= names, sorted(n for n in names if "flexattn" in n)


def test_eager_path_steps_aside_for_subclasses(monkeypatch):
    """A tensor subclass reaches the op (its __torch_function__ / __torch_dispatch__ may need to), not the
    implementation directly."""
    from flexattn_ops import flash_attn_func, ops

    class Sub(torch.Tensor):
        pass

    direct = []
    monkeypatch.setattr(ops, "_fwd_impl", lambda *args: direct.append(1))
    q, k, v = (torch.randn(1, 5, 2, 8).as_subclass(Sub) for _ in range(3))
    out = flash_attn_func(q, k, v)
    assert direct == [] and out.shape == (1, 5, 2, 8)


def test_eager_path_matches_the_op_in_corner_cases():
    """Where autograd's own machinery differs from a plain call, the eager path behaves as the op did: a
    vectorised jacobian (legacy vmap over the backward, whose per-item fallback is the dispatcher's); grad mode
    inside inference mode records nothing; an input fwd has no gradient for (alibi_slopes) gets none; bias and
    sinks get gradients when they alone require them."""
    from flexattn_ops import flash_attn_func

    q, k, v = (torch.randn(1, 3, 2, 16) for _ in range(3))
    jac = torch.autograd.functional.jacobian(lambda q: flash_attn_func(q, k, v, causal=True), q, vectorize=True)
    ref = torch.autograd.functional.jacobian(lambda q: flash_attn_func(q, k, v, causal=True), q)
    torch.testing.assert_close(jac, ref)

    qg = q.clone().requires_grad_()
    with torch.inference_mode(), torch.enable_grad():
        assert not flash_attn_func(qg, k, v).requires_grad
    slopes = torch.rand(2, requires_grad=True)
    assert not flash_attn_func(q, k, v, alibi_slopes=slopes).requires_grad

    bias, sinks = torch.randn(1, 2, 3, 3, requires_grad=True), torch.randn(2, requires_grad=True)
    dout = torch.randn(1, 3, 2, 16)
    got = torch.autograd.grad(flash_attn_func(q, k, v, attn_bias=bias, sinks=sinks), (bias, sinks), dout)
    a = AttnArgs(softmax_scale=16**-0.5, attn_bias=bias, sinks=sinks)
    want = torch.autograd.grad(torch.ops.flexattn.fwd(q, k, v, *a)[0], (bias, sinks), dout)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_func_grad_and_vjp(causal: bool):
    """torch.func.grad and vjp over flash_attn_func give autograd's gradients (GQA, odd lengths); a grad of
    grad raises, as double backward does."""
    from flexattn_ops import flash_attn_func

    q, k, v = torch.randn(2, 9, 4, 24), torch.randn(2, 13, 2, 24), torch.randn(2, 13, 2, 24)
    dout = torch.randn(2, 9, 4, 24)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    flash_attn_func(qg, kg, vg, causal=causal).backward(dout)

    def loss(q, k, v):
        return (flash_attn_func(q, k, v, causal=causal) * dout).sum()

    grads = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    _, vjp_fn = torch.func.vjp(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v)
    for got in (grads, vjp_fn(dout)):
        for g, want in zip(got, (qg.grad, kg.grad, vg.grad), strict=True):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.func.grad(lambda q: torch.func.grad(loss)(q, k, v).sum())(q)


def test_forward_mode_ad_raises():
    """fwd has no jvp: a dual input raises instead of silently getting a zero tangent; inside a dual level,
    inputs without tangents still run."""
    import torch.autograd.forward_ad as fwd_ad

    from flexattn_ops import flash_attn_func

    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    with fwd_ad.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode"):
            flash_attn_func(fwd_ad.make_dual(q, torch.randn_like(q)), k, v)
        assert flash_attn_func(q, k, v).shape == q.shape  # no tangent: runs (and raised nothing above)
