"""Jagged nested q/k/v through flash_attn_func: routed to the varlen path, output nested like q,
autograd back to the nested inputs; checked against the per-sequence oracle and the varlen call."""

from __future__ import annotations

import pytest
import torch

from flexattn_ops import flash_attn_func, flash_attn_varlen_func
from flexattn_ops.testing import assert_close_to_oracle, assert_rel_close, varlen_attention_ref

LENS_Q = [4, 0, 1, 9]
LENS_K = [6, 3, 1, 9]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("FLEXATTN_BACKEND", "reference")


def jagged(g: torch.Generator, lens: list[int], h: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    parts = [torch.randn(n, h, d, generator=g).to(dtype) for n in lens]
    return torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)


def cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"window_size": (2, 1), "softcap": 1.0}], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nested_forward_backward(dtype, kwargs):
    g = torch.Generator().manual_seed(0)
    q, k, v = jagged(g, LENS_Q, 4, 16, dtype), jagged(g, LENS_K, 2, 16, dtype), jagged(g, LENS_K, 1, 8, dtype)
    out = flash_attn_func(q, k, v, **kwargs)
    assert out.is_nested and out.layout == torch.jagged
    assert out.shape[0] == 4 and out.shape[1] == q.shape[1] and out.shape[2:] == (4, 8)  # q's ragged length
    assert torch.equal(out.offsets(), q.offsets())

    # The same call on packed tensors, and the oracle.
    qp, kp, vp = (x.values().detach().clone().requires_grad_() for x in (q, k, v))
    ref = flash_attn_varlen_func(qp, kp, vp, cu(LENS_Q), cu(LENS_K), max(LENS_Q), max(LENS_K), **kwargs)
    assert torch.equal(out.values(), ref)
    oracle, _ = varlen_attention_ref(qp, kp, vp, cu(LENS_Q), cu(LENS_K), **kwargs)
    base, _ = varlen_attention_ref(qp, kp, vp, cu(LENS_Q), cu(LENS_K), compute_dtype=dtype, **kwargs)
    if dtype == torch.float32:
        assert_rel_close("out", out.values(), oracle)
    else:
        assert_close_to_oracle("out", out.values(), oracle, base)

    dout_values = torch.randn(ref.shape, generator=g).to(dtype)
    dout = torch.nested.nested_tensor_from_jagged(dout_values, q.offsets())
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (qp, kp, vp), dout_values)
    for name, gr, rg in zip("qkv", grads, ref_grads, strict=True):
        assert gr.is_nested, name
        assert torch.equal(gr.values(), rg), name


def test_nested_backward_through_loss():
    """A scalar loss over the nested output reaches the nested leaves' .grad."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (jagged(g, LENS_Q, 2, 8, torch.float32) for _ in range(3))
    flash_attn_func(q, k, v, causal=True).values().square().sum().backward()
    assert q.grad is not None and q.grad.is_nested
    assert q.grad.values().abs().sum() > 0 and not q.grad.values().isnan().any()
    assert (q.grad.values()[q.offsets()[1] : q.offsets()[2]] == 0).all()  # the empty sequence


def test_nested_errors():
    g = torch.Generator().manual_seed(2)
    q, k = jagged(g, LENS_Q, 2, 8, torch.float32), jagged(g, LENS_K, 2, 8, torch.float32)
    with pytest.raises(TypeError, match="v: expected a jagged nested tensor"):
        flash_attn_func(q, k, torch.randn(4, 9, 2, 8))
    strided = torch.nested.nested_tensor([torch.randn(3, 2, 8)] * 4)
    with pytest.raises(TypeError, match="q: expected a jagged nested tensor.*layout torch.strided"):
        flash_attn_func(strided, k, k)
    with pytest.raises(ValueError, match="v: expected the sequence lengths of k"):
        flash_attn_func(q, k, jagged(g, [1, 2, 3, 4], 2, 8, torch.float32))
    with pytest.raises(ValueError, match="k/v: expected batch size 4"):
        flash_attn_func(q, *(jagged(g, LENS_K[:3], 2, 8, torch.float32) for _ in range(2)))
    with pytest.raises(ValueError, match="attn_bias: expected None with nested"):
        flash_attn_func(q, k, k, attn_bias=torch.randn(1))
    with pytest.raises(ValueError, match="ragged in dim 1"):
        flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2))


def test_nested_compiles_fullgraph(inductor_cache):
    """Nested inputs trace in one graph (offsets and max lengths come from the jagged metadata)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = jagged(g, LENS_Q, 4, 16, torch.float32), *(jagged(g, LENS_K, 2, 16, torch.float32) for _ in range(2))

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    ref = f(q, k, v)
    assert out.is_nested and torch.equal(out.values(), ref.values())
    # A scalar loss: a nested tangent built by hand trips AOTAutograd's subclass-metadata check.
    dvals = torch.randn(ref.values().shape, generator=g)
    grads = torch.autograd.grad((out.values() * dvals).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref.values() * dvals).sum(), (q, k, v))
    for gr, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(gr.values(), rg.values())
