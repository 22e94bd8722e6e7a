"""SPEC section 6: every bad input raises before any kernel runs, naming the argument, the
expectation and what was given; the backend choice says why a named backend cannot run."""

from __future__ import annotations

import pytest
import torch

import flexattn_ops.reference as reference
from flexattn_ops import explain_backend, flash_attn_func, flash_attn_kvpacked_func, flash_attn_varlen_func

B, S, H, D = 2, 8, 4, 16


def qkv(**shapes):
    q = torch.randn(shapes.get("q", (B, S, H, D)), dtype=shapes.get("dtype", torch.float32))
    k = torch.randn(shapes.get("k", (B, S, H, D)), dtype=shapes.get("kdtype", q.dtype))
    v = torch.randn(shapes.get("v", (B, S, H, D)), dtype=shapes.get("vdtype", q.dtype))
    return q, k, v


def cu(*lens, dtype=torch.int32):
    return torch.tensor([0, *lens], dtype=dtype).cumsum(0).to(dtype)


# (id, call, exception type, words the message must contain)
BAD_INPUTS = [
    ("q rank", lambda: flash_attn_func(*qkv(q=(B, S, H))), ValueError, ["q", "4-d", "(2, 8, 4)"]),
    ("k rank", lambda: flash_attn_func(*qkv(k=(S, H, D))), ValueError, ["k", "4-d"]),
    (
        "q dtype int",
        lambda: flash_attn_func(torch.ones(B, S, H, D, dtype=torch.int32), *qkv()[1:]),
        TypeError,
        ["q", "int32"],
    ),
    ("q float64", lambda: flash_attn_func(*qkv(dtype=torch.float64)), TypeError, ["q", "float64"]),
    ("dtype mix", lambda: flash_attn_func(*qkv(kdtype=torch.bfloat16)), TypeError, ["k", "bfloat16", "float32"]),
    ("v dtype mix", lambda: flash_attn_func(*qkv(vdtype=torch.float16)), TypeError, ["v", "float16"]),
    (
        "device mix",
        lambda: flash_attn_func(*qkv()[:2], torch.randn(B, S, H, D, device="meta")),
        ValueError,
        ["v", "cpu", "meta"],
    ),
    ("hk divides", lambda: flash_attn_func(*qkv(k=(B, S, 3, D))), ValueError, ["k", "4 heads", "3"]),
    ("hv divides", lambda: flash_attn_func(*qkv(v=(B, S, 3, D))), ValueError, ["v", "dividing", "3"]),
    ("head dim mismatch", lambda: flash_attn_func(*qkv(k=(B, S, H, D + 1))), ValueError, ["k", "head dim", "17"]),
    (
        "batch mismatch",
        lambda: flash_attn_func(*qkv(k=(B + 1, S, H, D), v=(B + 1, S, H, D))),
        ValueError,
        ["batch", "3"],
    ),
    ("seqlen k != v", lambda: flash_attn_func(*qkv(v=(B, S + 1, H, D))), ValueError, ["v", "(2, 9)"]),
    ("window < -1", lambda: flash_attn_func(*qkv(), window_size=(-2, 0)), ValueError, ["window_size[0]", "-2"]),
    ("window right < -1", lambda: flash_attn_func(*qkv(), window_size=(0, -5)), ValueError, ["window_size[1]"]),
    ("window not a pair", lambda: flash_attn_func(*qkv(), window_size=3), TypeError, ["window_size", "pair"]),
    ("dropout 1", lambda: flash_attn_func(*qkv(), dropout_p=1.0), ValueError, ["dropout_p", "[0, 1)", "1.0"]),
    ("dropout negative", lambda: flash_attn_func(*qkv(), dropout_p=-0.1), ValueError, ["dropout_p"]),
    ("softcap negative", lambda: flash_attn_func(*qkv(), softcap=-1.0), ValueError, ["softcap", ">= 0", "-1.0"]),
    (
        "bias broadcast",
        lambda: flash_attn_func(*qkv(), attn_bias=torch.randn(1, H, S, S + 1)),
        ValueError,
        ["attn_bias", "broadcastable", "(2, 4, 8, 8)", "(1, 4, 8, 9)"],
    ),
    ("bias rank 5", lambda: flash_attn_func(*qkv(), attn_bias=torch.randn(1, 1, H, S, S)), ValueError, ["attn_bias"]),
    (
        "bias dtype",
        lambda: flash_attn_func(*qkv(), attn_bias=torch.ones(S, S, dtype=torch.int64)),
        TypeError,
        ["attn_bias", "int64"],
    ),
    (
        "alibi shape",
        lambda: flash_attn_func(*qkv(), alibi_slopes=torch.rand(H + 1)),
        ValueError,
        ["alibi_slopes", "(4,)", "(5,)"],
    ),
    (
        "alibi dtype",
        lambda: flash_attn_func(*qkv(), alibi_slopes=torch.rand(H, dtype=torch.float16)),
        TypeError,
        ["alibi_slopes", "float16"],
    ),
    ("sinks shape", lambda: flash_attn_func(*qkv(), sinks=torch.randn(H, 1)), ValueError, ["sinks", "(4,)"]),
    (
        "kv packed shape",
        lambda: flash_attn_kvpacked_func(torch.randn(B, S, H, D), torch.randn(B, S, 3, H, D)),
        ValueError,
        ["kv", "2 at dim 2"],
    ),
    (
        "cu_seqlens dtype",
        lambda: flash_attn_varlen_func(
            *qkv(q=(10, H, D), k=(10, H, D), v=(10, H, D)), cu(4, 6, dtype=torch.int64), cu(4, 6), 6, 6
        ),
        TypeError,
        ["cu_seqlens_q", "int32", "int64"],
    ),
    (
        "cu_seqlens shape",
        lambda: flash_attn_varlen_func(*qkv(q=(10, H, D), k=(10, H, D), v=(10, H, D)), cu(4, 6), cu(4, 3, 3), 6, 6),
        ValueError,
        ["cu_seqlens_k", "(3,)", "(4,)"],
    ),
    (
        "varlen q rank",
        lambda: flash_attn_varlen_func(*qkv(), cu(4, 6), cu(4, 6), 6, 6),
        ValueError,
        ["q", "3-d", "total_q"],
    ),
    (
        "block_table dtype",
        lambda: flash_attn_varlen_func(
            torch.randn(10, H, D),
            torch.randn(4, 4, H, D),
            torch.randn(4, 4, H, D),
            cu(4, 6),
            cu(4, 6),
            6,
            6,
            block_table=torch.zeros(2, 2, dtype=torch.int64),
        ),
        TypeError,
        ["block_table", "int32", "int64"],
    ),
    (
        "paged k rank",
        lambda: flash_attn_varlen_func(
            torch.randn(10, H, D),
            torch.randn(16, H, D),
            torch.randn(16, H, D),
            cu(4, 6),
            cu(4, 6),
            6,
            6,
            block_table=torch.zeros(2, 2, dtype=torch.int32),
        ),
        ValueError,
        ["k", "4-d", "page_size"],
    ),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_before_any_kernel(call, exc, words, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    for name in ("fwd", "bwd", "probs"):
        monkeypatch.setattr(reference, name, no_kernel)
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in message: {info.value}"


def test_bad_input_raises_while_tracing():
    """The fakes validate too, so torch.compile reports bad inputs at trace time."""
    q, k, v = qkv(k=(B, S, 3, D))
    with pytest.raises(Exception, match="dividing the 4 heads of q"):
        torch.compile(flash_attn_func, fullgraph=True, backend="eager")(q, k, v)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FLEXATTN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FLEXATTN_BACKEND.*'tpu'"):
        flash_attn_func(*qkv())


@pytest.mark.parametrize("name,reason", [("cuda", "CUDA extension"), ("triton", "Triton runs on CUDA tensors")])
def test_named_backend_that_cannot_run_says_why(name, reason, monkeypatch):
    monkeypatch.setenv("FLEXATTN_BACKEND", name)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=f"FLEXATTN_BACKEND={name} cannot run fwd: .*{reason}"):
        flash_attn_func(*qkv())


def test_explain_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    choice = explain_backend(*qkv(), causal=True)
    assert choice.selected == "reference" and choice.requested == "auto"
    assert choice.reasons["reference"] is None
    assert "CUDA extension" in choice.reasons["cuda"]
    assert "CUDA tensors" in choice.reasons["triton"]


def test_auto_keeps_cpu_tensors_off_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    choice = explain_backend(*qkv())
    assert choice.selected == "reference"
    assert choice.reasons["triton"] is not None


def test_reference_by_name(monkeypatch):
    monkeypatch.setenv("FLEXATTN_BACKEND", "reference")
    q, k, v = qkv()
    assert explain_backend(q, k, v).selected == "reference"
    assert flash_attn_func(q, k, v).shape == (B, S, H, D)
