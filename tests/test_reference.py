"""The reference backend against the float64 oracle: every SPEC section 4 feature, forward and backward.

fp32 must match within 1e-5 relative; fp16/bf16 within 2x the error of plain PyTorch attention in
the same precision (`assert_close_to_oracle`).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flexattn_ops import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)
from flexattn_ops.reference import dropout_keep
from flexattn_ops.testing import assert_close_to_oracle, assert_rel_close, attention_ref
from tests.helpers import rand_qkv

SEQLENS = [(1, 113), (113, 203), (203, 113), (113, 1), (1023, 1023), (17, 1023)]
# (hq, hk, hv): MHA, GQA with hk != hv, MQA
HEADS = [(4, 4, 4), (6, 3, 2), (4, 1, 1)]
HEAD_DIMS = [(40, 40), (72, 111), (128, 64), (111, 72)]
FEATURES = ["plain", "causal", "window", "softcap_alibi", "bias_sinks", "alibi_batch_window_causal"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def feature_kwargs(feature: str, b: int, hq: int, sq: int, sk: int) -> dict:
    if feature == "plain":
        return {}
    if feature == "causal":
        return {"causal": True}
    if feature == "window":
        return {"window_size": (17, 5)}
    if feature == "softcap_alibi":
        return {"softcap": 3.0, "alibi_slopes": torch.rand(hq)}
    if feature == "bias_sinks":
        return {
            "attn_bias": torch.randn(1, hq, sq, sk, requires_grad=True),
            "sinks": torch.randn(hq, requires_grad=True),
        }
    if feature == "alibi_batch_window_causal":
        return {"alibi_slopes": torch.rand(b, hq), "window_size": (9, -1), "causal": True}
    raise ValueError(feature)


# A structured slice of the full product: every (dtype, seqlens, feature) triple, with head
# configurations and head dims cycled so each appears with every dtype and feature.
CASES = [
    (dtype, sqk, feature, HEADS[n % len(HEADS)], HEAD_DIMS[n % len(HEAD_DIMS)])
    for n, (dtype, sqk, feature) in enumerate(itertools.product(DTYPES, SEQLENS, FEATURES))
]


def _check(name: str, ours, oracle, baseline, dtype) -> None:
    if dtype == torch.float32:
        # 1e-5 relative; where the exact result is 0 (dq, dk with a single key) float32 rounding
        # of O(1) terms leaves ~1e-6, so an absolute 1e-5 (inputs are unit normals) is the floor.
        floor = 2 * (baseline.double() - oracle).abs().nan_to_num(0.0).max().item() + 1e-5
        assert_rel_close(name, ours, oracle, 1e-5, atol=floor)
    else:
        assert_close_to_oracle(name, ours, oracle, baseline, atol=1e-3)


@pytest.mark.parametrize(
    "dtype,seqlens,feature,heads,dims",
    CASES,
    ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{c[2]}-h{c[3]}-d{c[4]}".replace("torch.", "") for c in CASES],
)
def test_forward_backward_vs_oracle(dtype, seqlens, feature, heads, dims):
    (sq, sk), (hq, hk, hv), (dqk, dv) = seqlens, heads, dims
    b = 2
    q, k, v = rand_qkv(b, sq, sk, hq, hk, hv, dqk, dv, dtype, requires_grad=True)
    kw = feature_kwargs(feature, b, hq, sq, sk)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    ref, ref_lse = attention_ref(q, k, v, **kw)
    base, _ = attention_ref(q, k, v, compute_dtype=dtype, **kw)
    _check("out", out, ref, base, dtype)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    _check("lse", lse, ref_lse, ref_lse.to(dtype), dtype)

    inputs = [q, k, v] + [kw[n] for n in ("attn_bias", "sinks") if n in kw]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_grads = torch.autograd.grad(ref, inputs, dout.double())
    base_grads = torch.autograd.grad(base, inputs, dout)
    for name, g, rg, bg in zip("q k v bias sinks".split(), grads, ref_grads, base_grads, strict=False):
        assert g.shape == rg.shape
        _check(f"d{name}", g, rg, bg, dtype)


SQ, SK = 150, 170  # two query blocks of the reference, so windows cut key ranges per block


@pytest.mark.parametrize("bias_shape", [(1, 1, 1, SK), (2, 1, SQ, 1), (SQ, SK), (SK,), (2, 4, SQ, SK)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (20, 7)])
def test_bias_gradient_reduced_over_broadcast_axes(bias_shape, window):
    q, k, v = rand_qkv(2, SQ, SK, 4, 2, 2, 16, 16, torch.float32, requires_grad=True)
    bias = torch.randn(bias_shape, requires_grad=True)
    out = flash_attn_func(q, k, v, attn_bias=bias, window_size=window)
    ref, _ = attention_ref(q, k, v, attn_bias=bias, window_size=window)
    assert_rel_close("out", out, ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v, bias), dout.double())
    assert grads[3].shape == bias.shape
    for name, g, rg in zip(["q", "k", "v", "bias"], grads, ref_grads, strict=True):
        assert_rel_close(f"d{name}", g, rg, 1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sq,sk,kw",
    [(10, 3, {"causal": True}), (5, 40, {"window_size": (0, 0)}), (6, 6, {"window_size": (-1, -1), "sinks": True})],
)
def test_fully_masked_rows_are_zero_without_nan(sq, sk, kw):
    """Rows without keys (causal with sq > sk: the first sq - sk rows) give out 0, lse -inf and
    zero gradients, never NaN; with a sink the lse of such a row is the sink."""
    q, k, v = rand_qkv(1, sq, sk, 2, 2, 2, 16, 16, torch.float32, requires_grad=True)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(2, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    ref, ref_lse = attention_ref(q, k, v, **kw)
    assert_rel_close("out", out, ref)
    assert_rel_close("lse", lse, ref_lse)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert not torch.isnan(g).any(), f"NaN in d{name}"
        assert_rel_close(f"d{name}", g, rg, 1e-5, atol=1e-5)
    if "causal" in kw:
        empty = sq - sk
        assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
        assert torch.isneginf(lse[..., :empty]).all()
        assert torch.equal(grads[0][:, :empty], torch.zeros_like(grads[0][:, :empty]))


def test_no_keys_at_all():
    """seqlen_k = 0: out 0, lse -inf and zero gradients (the reference used to fail on the empty row max)."""
    q, k, v = rand_qkv(2, 5, 0, 2, 2, 2, 16, 8, torch.float32, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == (2, 5, 2, 8) and torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert torch.equal(dq, torch.zeros_like(dq))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_oracle_with_the_same_mask(dtype):
    p = 0.3
    q, k, v = rand_qkv(2, 37, 53, 4, 2, 1, 24, 40, dtype, requires_grad=True)
    torch.manual_seed(1234)
    out, _, probs = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    keep = probs >= 0
    frac = (probs > 0)[probs != 0].float().mean().item()  # over the unmasked entries
    assert abs(frac - (1 - p)) < 0.03, f"kept fraction {frac:.3f}, expected {1 - p}"
    ref, _ = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_keep=keep)
    base, _ = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_keep=keep, compute_dtype=dtype)
    _check("out", out, ref, base, dtype)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    base_grads = torch.autograd.grad(base, (q, k, v), dout)
    for name, g, rg, bg in zip("qkv", grads, ref_grads, base_grads, strict=True):
        _check(f"d{name}", g, rg, bg, dtype)
    # The same generator state gives the same mask; another gives another.
    torch.manual_seed(1234)
    again = flash_attn_func(q, k, v, dropout_p=p, causal=True)
    assert torch.equal(again, out)
    assert not torch.equal(flash_attn_func(q, k, v, dropout_p=p, causal=True), out)


def test_dropout_hash_is_uniform_and_decorrelated():
    rng = torch.tensor([123456789, 42])
    bh = torch.arange(8)[:, None]
    i = torch.arange(64)[None, :].expand(8, 64)
    j = torch.arange(512)[None, :]
    keep = dropout_keep(rng, bh, i, j, 0.5)
    assert abs(keep.float().mean().item() - 0.5) < 0.01
    # neighbouring rows and heads are not copies of each other
    assert (keep[:, 1:] != keep[:, :-1]).float().mean() > 0.45
    assert (keep[1:] != keep[:-1]).float().mean() > 0.45


def test_probs_match_oracle_softmax():
    q, k, v = rand_qkv(2, 19, 31, 4, 2, 2, 16, 16, torch.float32)
    _, lse, probs = flash_attn_func(q, k, v, causal=True, softcap=2.0, return_attn_probs=True)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(2, 2)) / 4.0
    s = 2.0 * torch.tanh(s / 2.0)
    mask = torch.arange(31)[None, :] <= torch.arange(19)[:, None] + 12
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    assert_rel_close("probs", probs, ref)
    assert_rel_close("lse", lse, torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1))


def test_deterministic_backward_is_bitwise_reproducible():
    q, k, v = rand_qkv(2, 70, 90, 4, 2, 2, 32, 32, torch.bfloat16, requires_grad=True)
    dout = torch.randn(2, 70, 4, 32, dtype=torch.bfloat16)
    runs = [
        torch.autograd.grad(flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
        for _ in range(3)
    ]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_packed_variants_match_unpacked():
    qkv = torch.randn(2, 33, 3, 4, 32, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    assert torch.equal(out, flash_attn_func(q, k, v, causal=True))
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    kv = torch.randn(2, 41, 2, 2, 32)
    out2 = flash_attn_kvpacked_func(q, kv, window_size=(4, 4))
    assert torch.equal(out2, flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], window_size=(4, 4)))


def test_softmax_scale_is_used():
    q, k, v = rand_qkv(1, 9, 9, 2, 2, 2, 16, 16, torch.float32)
    out = flash_attn_func(q, k, v, softmax_scale=0.7)
    ref, _ = attention_ref(q, k, v, softmax_scale=0.7)
    assert_rel_close("out", out, ref)
    assert not torch.allclose(out, flash_attn_func(q, k, v))
