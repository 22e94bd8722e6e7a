"""Varlen attention on the reference backend against the float64 oracle looped over sequences
(`testing.varlen_attention_ref`): forward and backward, packed and paged keys, seqused_k, every
score modifier, odd and zero lengths, lse layout (hq, total_q), packed qkv/kv wrappers."""

from __future__ import annotations

import pytest
import torch

from flexattn_ops import (
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from flexattn_ops.params import AttnArgs
from flexattn_ops.testing import (
    NoHostSync,
    assert_close_to_oracle,
    assert_rel_close,
    paged_to_packed,
    varlen_attention_ref,
)

DTYPES = [torch.float32, torch.bfloat16]
# Zero-length and length-1 sequences, odd lengths; keys >= queries per sequence so causal and
# windowed rows always keep a key (rows without keys are tested on their own below).
LENS_Q = [5, 0, 1, 17, 3, 2]
LENS_K = [7, 4, 1, 17, 0, 9]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("FLEXATTN_BACKEND", "reference")


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def rand(g: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_()


def score_kwargs(feature: str, hq: int, batch: int, g: torch.Generator) -> dict:
    if feature == "causal":
        return {"causal": True}
    if feature == "window":
        return {"window_size": (3, 2)}
    if feature == "window_left":
        return {"window_size": (2, -1), "causal": True}
    if feature == "softcap":
        return {"softcap": 0.8}
    if feature == "alibi_head":
        return {"alibi_slopes": torch.rand(hq, generator=g) + 0.1, "causal": True}
    if feature == "alibi_batch":
        return {"alibi_slopes": torch.rand(batch, hq, generator=g) + 0.1}
    if feature == "sinks":
        return {"sinks": torch.randn(hq, generator=g).requires_grad_()}
    assert feature == "none"
    return {}


def compare(name: str, ours, oracle, baseline, dtype) -> None:
    """fp32: 2e-5 relative, with a 1e-5 floor where the exact result is ~0 (dq with one key per row
    leaves float32 rounding of O(1) terms). Low precision: 2x the baseline's error plus one ulp at
    the largest value (the final rounding, which on tiny tensors the baseline can dodge by luck)."""
    if dtype == torch.float32:
        assert_rel_close(name, ours, oracle, rtol=2e-5, atol=1e-5)
    else:
        finite = oracle[torch.isfinite(oracle)]
        ulp = torch.finfo(dtype).eps * (finite.abs().max().item() if finite.numel() else 0.0)
        assert_close_to_oracle(name, ours, oracle, baseline, atol=max(1e-3, ulp))


def check_fwd_bwd(
    q, k, v, lens_q, lens_k, kwargs, *, seqused_k=None, block_table=None, packed_k=None, packed_v=None
) -> None:
    """Our out, lse and gradients (q, k, v, sinks) against the oracle and the low-precision baseline.

    With `block_table`, k/v are paged caches and `packed_k/v(cache)` rebuild the packed keys the
    oracle sees (differentiably, so its gradients land on the cache)."""
    dtype = q.dtype
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    call_kw = {key: val for key, val in kwargs.items() if key != "sinks"}
    sinks = kwargs.get("sinks")
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(lens_q),
        max(lens_k),
        block_table=block_table,
        seqused_k=seqused_k,
        sinks=sinks,
        **call_kw,
    )
    assert out.shape == (q.shape[0], q.shape[1], v.shape[-1]) and out.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(dtype)
    inputs = [x for x in (q, k, v, sinks) if x is not None]
    grads = torch.autograd.grad(out, inputs, dout)

    def oracle(compute_dtype):
        kk = packed_k(k) if packed_k is not None else k
        vv = packed_v(v) if packed_v is not None else v
        return varlen_attention_ref(q, kk, vv, cu_q, cu_k, seqused_k=seqused_k, compute_dtype=compute_dtype, **kwargs)

    ref_out, ref_lse = oracle(torch.float64)
    base_out, base_lse = oracle(dtype)
    if ref_out.requires_grad:
        # bwd's contract: gradients for the `out` it is given (ring attention passes a merged one),
        # so delta_i = dO_i . out_i uses our stored out. That shifts the exact gradients by
        # -(dO_i . (out_i - O_i)) * d lse_i: the oracle takes the same shift, and what remains is
        # our float32 arithmetic and final rounding.
        shift = (dout.double() * (out.detach().double() - ref_out.detach())).sum(-1).T  # (hq, total_q)
        lse_live = torch.where(torch.isfinite(ref_lse), ref_lse, 0.0)
        loss = (ref_out * dout.double()).sum() - (shift * lse_live).sum()
        ref_grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        base_grads = torch.autograd.grad(base_out, inputs, dout, allow_unused=True)
    else:  # no query row has a key: every gradient is 0
        ref_grads = base_grads = (None,) * len(inputs)
    compare("out", out, ref_out, base_out, dtype)

    # lse from the op itself: (hq, total_q) float32.
    a = AttnArgs(
        cu_q,
        cu_k,
        seqused_k,
        block_table,
        max(lens_q),
        max(lens_k),
        q.shape[-1] ** -0.5,
        *_window(kwargs),
        kwargs.get("softcap", 0.0),
        kwargs.get("alibi_slopes"),
        None,
        sinks,
    )
    _, lse = torch.ops.flexattn.fwd(q.detach(), k.detach(), v.detach(), *a)
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32 and lse.is_contiguous()
    compare("lse", lse, ref_lse, base_lse, dtype)
    for name, gr, rg, bg in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, base_grads, strict=False):
        assert not gr.isnan().any(), name
        rg = torch.zeros_like(gr, dtype=torch.float64) if rg is None else rg
        bg = torch.zeros_like(gr) if bg is None else bg
        compare(name, gr, rg, bg, dtype)


def _window(kwargs: dict) -> tuple[int, int]:
    left, right = kwargs.get("window_size", (-1, -1))
    return left, 0 if kwargs.get("causal") else right


@pytest.mark.parametrize(
    "feature", ["none", "causal", "window", "window_left", "softcap", "alibi_head", "alibi_batch", "sinks"]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed(dtype, feature):
    g = torch.Generator().manual_seed(0)
    hq, hk, hv, dqk, dv = 6, 2, 3, 24, 8
    q = rand(g, dtype, sum(LENS_Q), hq, dqk)
    k, v = rand(g, dtype, sum(LENS_K), hk, dqk), rand(g, dtype, sum(LENS_K), hv, dv)
    check_fwd_bwd(q, k, v, LENS_Q, LENS_K, score_kwargs(feature, hq, len(LENS_Q), g))


@pytest.mark.parametrize(
    "heads,dims", [((4, 4, 4), (16, 16)), ((4, 1, 1), (8, 32)), ((6, 3, 2), (40, 24)), ((2, 1, 2), (7, 5))]
)
def test_heads_and_dims(heads, dims):
    """MHA, MQA, GQA with hk != hv, dqk != dv, odd head dims."""
    g = torch.Generator().manual_seed(1)
    (hq, hk, hv), (dqk, dv) = heads, dims
    q = rand(g, torch.float32, sum(LENS_Q), hq, dqk)
    k, v = rand(g, torch.float32, sum(LENS_K), hk, dqk), rand(g, torch.float32, sum(LENS_K), hv, dv)
    check_fwd_bwd(q, k, v, LENS_Q, LENS_K, {"causal": True})


@pytest.mark.parametrize("dtype", DTYPES)
def test_seqused_k(dtype):
    """seqused_k uses a prefix of each sequence's keys (bottom-right alignment on the used count)."""
    g = torch.Generator().manual_seed(2)
    used = torch.tensor([5, 0, 1, 12, 0, 9], dtype=torch.int32)
    q = rand(g, dtype, sum(LENS_Q), 4, 16)
    k, v = rand(g, dtype, sum(LENS_K), 2, 16), rand(g, dtype, sum(LENS_K), 2, 16)
    check_fwd_bwd(q, k, v, LENS_Q, LENS_K, {"causal": True}, seqused_k=used)


def paged(g: torch.Generator, dtype, lens_k: list[int], page: int, h: int, d: int):
    """A paged cache with each sequence's pages drawn at random from a shuffled pool (spare pages too)."""
    blocks = max(1, -(-max(lens_k) // page))
    pool = len(lens_k) * blocks + 2
    table = torch.randperm(pool, generator=g)[: len(lens_k) * blocks].reshape(len(lens_k), blocks).to(torch.int32)
    return rand(g, dtype, pool, page, h, d), table


@pytest.mark.parametrize("feature", ["causal", "alibi_batch", "sinks"])
@pytest.mark.parametrize("page", [1, 3, 16, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged(dtype, page, feature):
    """Paged K/V through block_table, any page size; gradients land on the cache pages."""
    g = torch.Generator().manual_seed(page)
    hq, hk, hv = 4, 2, 1
    q = rand(g, dtype, sum(LENS_Q), hq, 16)
    k_cache, table = paged(g, dtype, LENS_K, page, hk, 16)
    v_cache = rand(g, dtype, *k_cache.shape[:2], hv, 12)
    kwargs = score_kwargs(feature, hq, len(LENS_Q), g)
    check_fwd_bwd(
        q,
        k_cache,
        v_cache,
        LENS_Q,
        LENS_K,
        kwargs,
        block_table=table,
        packed_k=lambda c: paged_to_packed(c, table, LENS_K),
        packed_v=lambda c: paged_to_packed(c, table, LENS_K),
    )


def test_paged_with_seqused_k():
    g = torch.Generator().manual_seed(5)
    used = [3, 4, 1, 10, 0, 9]
    q = rand(g, torch.float32, sum(LENS_Q), 4, 16)
    k_cache, table = paged(g, torch.float32, LENS_K, 3, 2, 16)
    v_cache = rand(g, torch.float32, *k_cache.shape[:2], 2, 16)
    check_fwd_bwd(
        q,
        k_cache,
        v_cache,
        LENS_Q,
        LENS_K,
        {"causal": True},
        seqused_k=torch.tensor(used, dtype=torch.int32),
        block_table=table,
        packed_k=lambda c: paged_to_packed(c, table, LENS_K),
        packed_v=lambda c: paged_to_packed(c, table, LENS_K),
    )


def test_rows_without_keys():
    """Causal with more queries than keys, and sequences with no keys: out 0, lse -inf, zero grads, no NaN."""
    g = torch.Generator().manual_seed(6)
    lens_q, lens_k = [6, 3, 2], [2, 0, 5]
    q = rand(g, torch.float32, sum(lens_q), 2, 8)
    k, v = rand(g, torch.float32, sum(lens_k), 2, 8), rand(g, torch.float32, sum(lens_k), 2, 8)
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    a = AttnArgs(cu_q, cu_k, None, None, 6, 5, 8**-0.5, -1, 0)
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    dead = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert (out[dead] == 0).all() and torch.isneginf(lse[:, dead]).all()
    assert torch.isfinite(lse[:, ~dead]).all()
    ref_out, ref_lse = varlen_attention_ref(q, k, v, cu_q, cu_k, causal=True)
    assert_rel_close("out", out, ref_out)
    assert_rel_close("lse", lse, ref_lse)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert not any(x.isnan().any() for x in (dq, dk, dv))
    assert (dq[dead] == 0).all()


def test_rows_beyond_last_sequence_are_ignored():
    """q rows past cu_seqlens_q[-1] belong to no sequence: out 0, lse -inf (flash-attn leaves them)."""
    g = torch.Generator().manual_seed(7)
    q = rand(g, torch.float32, 9, 2, 8)
    k, v = rand(g, torch.float32, 7, 2, 8), rand(g, torch.float32, 7, 2, 8)
    a = AttnArgs(cu([3, 4]), cu([3, 4]), None, None, 4, 4, 0.3)
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    assert (out[7:] == 0).all() and torch.isneginf(lse[:, 7:]).all()
    ref_out, ref_lse = varlen_attention_ref(q, k, v, cu([3, 4]), cu([3, 4]), softmax_scale=0.3)
    assert_rel_close("out", out, ref_out)
    assert_rel_close("lse", lse, ref_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked(causal):
    g = torch.Generator().manual_seed(8)
    lens = [5, 1, 0, 11]
    qkv = rand(g, torch.float32, sum(lens), 3, 4, 16)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu(lens), max(lens), causal=causal)
    q, k, v = (x.detach().clone().requires_grad_() for x in qkv.unbind(1))
    ref = flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=causal)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert torch.equal(dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), dout), dim=1))
    ref_out, _ = varlen_attention_ref(q, k, v, cu(lens), cu(lens), causal=causal)
    assert_rel_close("out", out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kvpacked(dtype):
    g = torch.Generator().manual_seed(9)
    q = rand(g, dtype, sum(LENS_Q), 4, 16)
    kv = rand(g, dtype, sum(LENS_K), 2, 2, 16)
    out = flash_attn_varlen_kvpacked_func(q, kv, cu(LENS_Q), cu(LENS_K), max(LENS_Q), max(LENS_K), causal=True)
    k, v = (x.detach().clone().requires_grad_() for x in kv.unbind(1))
    ref = flash_attn_varlen_func(q, k, v, cu(LENS_Q), cu(LENS_K), max(LENS_Q), max(LENS_K), causal=True)
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    (dkv,) = torch.autograd.grad(out, kv, dout)
    assert torch.equal(dkv, torch.stack(torch.autograd.grad(ref, (k, v), dout), dim=1))


def test_dropout_varlen_is_reproducible():
    """Dropout on the varlen path draws its mask from rng_state: same state, same output."""
    g = torch.Generator().manual_seed(10)
    q = rand(g, torch.float32, sum(LENS_Q), 2, 8)
    k, v = rand(g, torch.float32, sum(LENS_K), 2, 8), rand(g, torch.float32, sum(LENS_K), 2, 8)
    a = AttnArgs(cu(LENS_Q), cu(LENS_K), None, None, 17, 17, 0.3, dropout_p=0.3, rng_state=torch.tensor([7, 3]))
    out1, _ = torch.ops.flexattn.fwd(q, k, v, *a)
    out2, _ = torch.ops.flexattn.fwd(q, k, v, *a)
    assert torch.equal(out1, out2)
    no_drop, _ = torch.ops.flexattn.fwd(q, k, v, *a._replace(dropout_p=0.0, rng_state=None))
    assert not torch.equal(out1, no_drop)


def test_return_attn_probs_gives_lse_like_flash_attn():
    """flash-attn callers unpack (out, softmax_lse, S_dmask) with S_dmask None when there is no dropout."""
    g = torch.Generator().manual_seed(11)
    q = rand(g, torch.float32, sum(LENS_Q), 4, 16)
    k, v = rand(g, torch.float32, sum(LENS_K), 2, 16), rand(g, torch.float32, sum(LENS_K), 2, 16)
    args = (q, k, v, cu(LENS_Q), cu(LENS_K), max(LENS_Q), max(LENS_K))
    out, lse, probs = flash_attn_varlen_func(*args, causal=True, return_attn_probs=True)
    assert probs is None and lse.shape == (4, sum(LENS_Q)) and lse.dtype == torch.float32
    ref_out, ref_lse = varlen_attention_ref(q, k, v, cu(LENS_Q), cu(LENS_K), causal=True)
    assert_rel_close("out", out, ref_out)
    assert_rel_close("lse", lse, ref_lse)
    out.sum().backward()  # lse is returned without breaking autograd
    assert q.grad is not None
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_varlen_func(*args, dropout_p=0.1, return_attn_probs=True)


# ---------------------------------------------------------------------------------------------
# opcheck, no host synchronisation, compile


def _varlen_op_args(layout: str, paged_kv: bool, requires_grad: bool = False):
    g = torch.Generator().manual_seed(12)
    lens_q, lens_k = [3, 0, 5], [4, 2, 5]
    q = torch.randn(sum(lens_q), 4, 16, generator=g)
    if paged_kv:
        k, table = paged(g, torch.float32, lens_k, 3, 2, 16)
        k, v = k.detach(), torch.randn(*k.shape[:2], 1, 8, generator=g)
    else:
        table = None
        k, v = torch.randn(sum(lens_k), 2, 16, generator=g), torch.randn(sum(lens_k), 1, 8, generator=g)
    if layout == "permuted":
        q, k, v = (x.transpose(-2, -3).contiguous().transpose(-2, -3) for x in (q, k, v))
    elif layout == "sliced":
        q = torch.cat([q, q], -1)[..., 3:19]
        k = torch.cat([k, k], -2)[..., ::2, :]
    a = AttnArgs(cu(lens_q), cu(lens_k), None, table, 5, 5, 0.25, -1, 0, 0.5, torch.rand(3, 4, generator=g) + 0.1)
    a = a._replace(sinks=torch.randn(4, generator=g))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)], a


@pytest.mark.parametrize("paged_kv", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
def test_opcheck_varlen(layout, paged_kv):
    (q, k, v), a = _varlen_op_args(layout, paged_kv, requires_grad=True)
    torch.library.opcheck(torch.ops.flexattn.fwd.default, (q, k, v, *a))
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.flexattn.bwd.default, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, *a, False)
    )


def test_varlen_never_syncs_host():
    """Forward and backward on packed and paged keys without any host read or data-dependent shape."""
    for paged_kv in (False, True):
        (q, k, v), a = _varlen_op_args("contiguous", paged_kv, requires_grad=True)
        with NoHostSync():
            out, _ = torch.ops.flexattn.fwd(q, k, v, *a)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def test_varlen_compiles_fullgraph(monkeypatch, inductor_cache):
    """fullgraph with scalar capture off: a .item()/.tolist() anywhere would fail the trace."""
    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", False)
    (q, k, v), a = _varlen_op_args("contiguous", True, requires_grad=True)

    def step(q, k, v, cu_q, cu_k, table):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, causal=True, block_table=table)

    args = (q, k, v, a.cu_seqlens_q, a.cu_seqlens_k, a.block_table)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    ref = step(*args)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(out))
    for gr, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(gr, rg)


# ---------------------------------------------------------------------------------------------
# Validation (SPEC section 6)


def _valid_varlen(paged_kv: bool = False) -> dict:
    (q, k, v), a = _varlen_op_args("contiguous", paged_kv)
    return dict(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=a.cu_seqlens_q,
        cu_seqlens_k=a.cu_seqlens_k,
        max_seqlen_q=5,
        max_seqlen_k=5,
        block_table=a.block_table,
    )


VARLEN_BAD = [
    ("cu_q_dtype", False, {"cu_seqlens_q": lambda kw: kw["cu_seqlens_q"].long()}, TypeError, "cu_seqlens_q: .*int32"),
    ("cu_k_dtype", False, {"cu_seqlens_k": lambda kw: kw["cu_seqlens_k"].float()}, TypeError, "cu_seqlens_k: .*int32"),
    ("cu_q_rank", False, {"cu_seqlens_q": lambda kw: kw["cu_seqlens_q"][None]}, ValueError, "cu_seqlens_q: .*1-d"),
    ("cu_k_shape", False, {"cu_seqlens_k": lambda kw: kw["cu_seqlens_k"][:3]}, ValueError, "cu_seqlens_k: .*shape"),
    ("cu_k_none", False, {"cu_seqlens_k": lambda kw: None}, ValueError, "cu_seqlens_k: expected"),
    ("q_rank", False, {"q": lambda kw: kw["q"][None]}, ValueError, "q: expected a 3-d"),
    ("k_rank", False, {"k": lambda kw: kw["k"][None]}, ValueError, "k: expected a 3-d"),
    ("max_seqlen", False, {"max_seqlen_q": lambda kw: -1}, ValueError, "max_seqlen_q/max_seqlen_k"),
    ("seqused_dtype", False, {"seqused_k": lambda kw: torch.ones(3)}, TypeError, "seqused_k: .*int32"),
    ("seqused_shape", False, {"seqused_k": lambda kw: torch.ones(2, dtype=torch.int32)}, ValueError, "seqused_k"),
    ("table_dtype", True, {"block_table": lambda kw: kw["block_table"].long()}, TypeError, "block_table: .*int32"),
    ("table_rank", True, {"block_table": lambda kw: kw["block_table"][0]}, ValueError, "block_table: .*2-d"),
    ("table_rows", True, {"block_table": lambda kw: kw["block_table"][:2]}, ValueError, "block_table: expected 3 rows"),
    ("paged_k_rank", True, {"k": lambda kw: kw["k"][0]}, ValueError, "k: expected a 4-d"),
    ("paged_v_pages", True, {"v": lambda kw: kw["v"][:-1]}, ValueError, "v: expected the leading shape of k"),
    ("alibi_batch", False, {"alibi_slopes": lambda kw: torch.rand(2, 4)}, ValueError, "alibi_slopes: expected shape"),
]


@pytest.mark.parametrize("name,paged_kv,changes,exc,match", VARLEN_BAD, ids=[b[0] for b in VARLEN_BAD])
def test_varlen_validation(name, paged_kv, changes, exc, match):
    kw = _valid_varlen(paged_kv)
    kw.update({key: fn(kw) for key, fn in changes.items()})
    with pytest.raises(exc, match=match):
        flash_attn_varlen_func(**kw)


def test_paged_shared_prefix_pages():
    """Sequences sharing pages (prefix caching): forward reads them for each, backward sums into them."""
    g = torch.Generator().manual_seed(13)
    lens_q, lens_k = [2, 3, 1], [7, 8, 5]
    q = rand(g, torch.float32, sum(lens_q), 4, 16)
    k_cache, v_cache = rand(g, torch.float32, 9, 3, 2, 16), rand(g, torch.float32, 9, 3, 2, 8)
    table = torch.tensor([[4, 0, 7], [4, 0, 2], [4, 5, 1]], dtype=torch.int32)  # page 4 in all, 0 in two
    check_fwd_bwd(
        q,
        k_cache,
        v_cache,
        lens_q,
        lens_k,
        {"causal": True},
        block_table=table,
        packed_k=lambda c: paged_to_packed(c, table, lens_k),
        packed_v=lambda c: paged_to_packed(c, table, lens_k),
    )


@pytest.mark.parametrize("seed", range(10))
def test_random_feature_combinations(seed):
    """Random lengths (zeros and ones included), heads, dims, masks, score mods, seqused_k and pages."""
    g = torch.Generator().manual_seed(2000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    batch = pick([1, 3, 5])
    lens_q = [pick([0, 1, 2, 7, 13]) for _ in range(batch)]
    lens_k = [n + pick([0, 1, 6]) for n in lens_q]
    hq, hk, hv = pick([(4, 2, 1), (6, 3, 2), (2, 2, 2)])
    dqk, dv = pick([(16, 16), (24, 8), (8, 40)])
    dtype = pick(DTYPES)
    kwargs = {"causal": pick([False, True])}
    if pick([False, True]):
        kwargs["window_size"] = (pick([-1, 0, 3]), pick([-1, 1]))
    if pick([False, True]):
        kwargs["softcap"] = 1.3
    if pick([False, True]):
        kwargs["alibi_slopes"] = torch.rand(pick([(hq,), (batch, hq)]), generator=g) + 0.1
    if pick([False, True]):
        kwargs["sinks"] = torch.randn(hq, generator=g).requires_grad_()
    used = [n - pick([0, 0, 1]) if n > m else n for n, m in zip(lens_k, lens_q, strict=True)]
    seqused = torch.tensor(used, dtype=torch.int32) if pick([False, True]) else None
    used_lens = used if seqused is not None else lens_k
    q = rand(g, dtype, sum(lens_q), hq, dqk)
    page = pick([None, 1, 3, 16])
    if page is None:
        k, v = rand(g, dtype, sum(lens_k), hk, dqk), rand(g, dtype, sum(lens_k), hv, dv)
        check_fwd_bwd(q, k, v, lens_q, lens_k, kwargs, seqused_k=seqused)
        return
    k, table = paged(g, dtype, lens_k, page, hk, dqk)
    v = rand(g, dtype, *k.shape[:2], hv, dv)
    check_fwd_bwd(
        q,
        k,
        v,
        lens_q,
        lens_k,
        kwargs,
        seqused_k=seqused,
        block_table=table,
        packed_k=lambda c: paged_to_packed(c, table, lens_k),
        packed_v=lambda c: paged_to_packed(c, table, lens_k),
    )
    assert used_lens  # (the oracle slices seqused_k itself)


def test_padding_tokens_past_the_last_sequence_get_no_sink():
    """Tokens past cu_seqlens_q[-1] belong to no sequence: out 0 and lse -inf, even with sinks."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q = torch.randn(15, 4, 16)  # 3 padding tokens
    k, v = torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    sinks = torch.randn(4)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, sinks=sinks, return_attn_probs=True)
    assert torch.equal(out[12:], torch.zeros_like(out[12:]))
    assert torch.isneginf(lse[:, 12:]).all()
    assert torch.isfinite(lse[:, :12]).all()
