"""Varlen attention on the Triton kernels under TRITON_INTERPRET=1: packed and paged keys, seqused_k,
padding tokens, every score modifier, forward and backward, against the per-sequence float64 oracle
(the checks of tests/test_varlen.py) and, for dropout, against the reference backend, which draws
the same mask. Outputs are poisoned (uninitialised memory is NaN), so a row no program writes fails.
Lengths include 0 and 1 and stay below one 16-row interpreter tile or cross it (17), so the
masked edges, the empty programs and the multi-tile paths all run.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import tests.test_varlen as tv  # noqa: E402
from flexattn_ops import dispatch  # noqa: E402
from flexattn_ops import triton_tuning as tuning  # noqa: E402
from flexattn_ops.params import AttnArgs  # noqa: E402
from tests.test_varlen import LENS_K, LENS_Q, check_fwd_bwd, cu, paged, rand, score_kwargs  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("triton_backend_poisoned"),
]

F32, BF16 = torch.float32, torch.bfloat16


def _paged_check(g, dtype, lens_q, lens_k, page, heads, dims, kwargs, seqused=None) -> None:
    hq, hk, hv = heads
    q = rand(g, dtype, sum(lens_q), hq, dims[0])
    k_cache, table = paged(g, dtype, lens_k, page, hk, dims[0])
    v_cache = rand(g, dtype, *k_cache.shape[:2], hv, dims[1])
    used = torch.tensor(seqused, dtype=torch.int32) if seqused is not None else None
    check_fwd_bwd(
        q,
        k_cache,
        v_cache,
        lens_q,
        lens_k,
        kwargs,
        seqused_k=used,
        block_table=table,
        packed_k=lambda c: tv.paged_to_packed(c, table, lens_k),
        packed_v=lambda c: tv.paged_to_packed(c, table, lens_k),
    )


@pytest.mark.parametrize(
    "feature,dtype",
    [(f, F32) for f in ("none", "causal", "window", "window_left", "softcap", "alibi_head", "alibi_batch", "sinks")]
    + [("causal", BF16), ("alibi_batch", BF16), ("sinks", BF16)],
)
def test_packed(feature: str, dtype: torch.dtype) -> None:
    """GQA with hk != hv and dqk != dv, zero- and one-token sequences, every score modifier."""
    g = torch.Generator().manual_seed(0)
    hq, hk, hv, dqk, dv = 6, 2, 3, 24, 8
    q = rand(g, dtype, sum(LENS_Q), hq, dqk)
    k, v = rand(g, dtype, sum(LENS_K), hk, dqk), rand(g, dtype, sum(LENS_K), hv, dv)
    kwargs = score_kwargs(feature, hq, len(LENS_Q), g)
    assert dispatch.explain("fwd", q, k, v, AttnArgs(cu(LENS_Q), cu(LENS_K))).selected == "triton"
    check_fwd_bwd(q, k, v, LENS_Q, LENS_K, kwargs)


@pytest.mark.parametrize("heads,dims", [((4, 1, 1), (8, 32)), ((4, 2, 2), (40, 40)), ((2, 1, 2), (7, 5))])
def test_heads_and_dims(heads, dims) -> None:
    """MQA, GQA with hk == hv (dK/dV summed in registers), hk != hv, padded odd head dims."""
    g = torch.Generator().manual_seed(1)
    (hq, hk, hv), (dqk, dv) = heads, dims
    q = rand(g, F32, sum(LENS_Q), hq, dqk)
    k, v = rand(g, F32, sum(LENS_K), hk, dqk), rand(g, F32, sum(LENS_K), hv, dv)
    check_fwd_bwd(q, k, v, LENS_Q, LENS_K, {"causal": True})


def test_seqused_k_unequal_lengths() -> None:
    """seqused_k below the packed lengths: keys past it get zero gradients (the buffer is zero-filled)."""
    g = torch.Generator().manual_seed(2)
    used = torch.tensor([5, 0, 1, 12, 0, 9], dtype=torch.int32)
    q = rand(g, F32, sum(LENS_Q), 4, 16)
    k, v = rand(g, F32, sum(LENS_K), 2, 16), rand(g, F32, sum(LENS_K), 2, 16)
    check_fwd_bwd(q, k, v, LENS_Q, LENS_K, {"window_size": (4, 1)}, seqused_k=used)


@pytest.mark.parametrize("page,feature", [(1, "causal"), (3, "alibi_batch"), (16, "sinks"), (3, "softcap")])
def test_paged(page: int, feature: str) -> None:
    """Paged K/V through block_table with pages of 1, 3 and 16 slots; gradients summed onto the cache."""
    g = torch.Generator().manual_seed(page)
    _paged_check(g, F32, LENS_Q, LENS_K, page, (4, 2, 1), (16, 12), score_kwargs(feature, 4, len(LENS_Q), g))


# Longer sequences for the page-lookup paths: several pages per sequence and several 16-key tiles per page.
LONG_Q, LONG_K = [9, 0, 40, 1, 33], [40, 3, 70, 1, 33]


@pytest.mark.parametrize("page,dtype,aligned", [(32, F32, True), (48, BF16, True), (1, F32, False), (24, F32, False)])
def test_paged_lookup_per_tile_and_per_key(page: int, dtype: torch.dtype, aligned: bool) -> None:
    """Both page-lookup paths against the oracle, forward and backward (every kernel that reads K/V).
    Page sizes that are multiples of the interpreter's BLOCK_N (32, 48) look block_table up once per
    key tile (PAGE_TILE_ALIGNED); 1 and 24 (tiles straddle pages) once per key. The table is a shuffled
    draw from a pool with spare pages, and the window (20, 5) makes key tiles start mid-page (keys 16, 32,
    48 ...), so a tile that read the wrong page or the wrong slot inside it would fail."""
    assert tuning.page_tile_aligned(page, tuning.INTERPRET_CONFIG["BLOCK_N"]) is aligned
    g = torch.Generator().manual_seed(30 + page)
    _paged_check(g, dtype, LONG_Q, LONG_K, page, (2, 1, 1), (16, 8), {"window_size": (20, 5)})


def test_paged_bf16_seqused_k() -> None:
    g = torch.Generator().manual_seed(4)
    _paged_check(g, BF16, LENS_Q, LENS_K, 3, (4, 2, 2), (16, 16), {"causal": True}, seqused=[3, 4, 1, 10, 0, 9])


def test_paged_shared_pages() -> None:
    """Prefix caching: page 4 in every sequence, page 0 in two; dK/dV of a shared page sum over its readers."""
    tv.test_paged_shared_prefix_pages()


def test_rows_without_keys() -> None:
    """More queries than keys under causal, and a sequence with no key: out 0, lse -inf, no NaN."""
    tv.test_rows_without_keys()


def test_padding_tokens_past_last_sequence() -> None:
    """Query tokens past cu_seqlens_q[-1] (more of them than max_seqlen_q): out 0, lse -inf, dq 0,
    written although no sequence's program owns them; sinks skip them in dsink."""
    g = torch.Generator().manual_seed(7)
    q = rand(g, F32, 7 + 37, 2, 8)
    k, v = rand(g, F32, 7, 2, 8), rand(g, F32, 7, 2, 8)
    sinks = torch.randn(2, generator=g).requires_grad_()
    a = AttnArgs(cu([3, 4]), cu([3, 4]), None, None, 4, 4, 0.3, sinks=sinks)
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    assert (out[7:] == 0).all() and torch.isneginf(lse[:, 7:]).all() and torch.isfinite(lse[:, :7]).all()
    ref_out, ref_lse = tv.varlen_attention_ref(q, k, v, cu([3, 4]), cu([3, 4]), softmax_scale=0.3, sinks=sinks)
    tv.assert_rel_close("out", out, ref_out)
    tv.assert_rel_close("lse", lse, ref_lse)
    dq, dk, dv, dsink = torch.autograd.grad(out, (q, k, v, sinks), torch.randn_like(out))
    assert (dq[7:] == 0).all() and not any(x.isnan().any() for x in (dq, dk, dv, dsink))


def _dropout_args(g: torch.Generator, paged_kv: bool):
    lens_q, lens_k = [5, 0, 1, 17, 3], [7, 4, 1, 17, 9]
    q = rand(g, F32, sum(lens_q) + 2, 4, 16)  # two padding tokens
    if paged_kv:
        k, table = paged(g, F32, lens_k, 3, 2, 16)
        v = rand(g, F32, *k.shape[:2], 1, 8)
    else:
        k, table = rand(g, F32, sum(lens_k), 2, 16), None
        v = rand(g, F32, sum(lens_k), 1, 8)
    slopes = torch.rand(len(lens_q), 4, generator=g) + 0.1
    rng = torch.tensor([1234, 5], dtype=torch.int64)
    a = AttnArgs(cu(lens_q), cu(lens_k), None, table, 17, 17, 0.25, -1, 0, 0.0, slopes, dropout_p=0.3, rng_state=rng)
    return (q, k, v), a


@pytest.mark.parametrize("paged_kv", [False, True])
def test_dropout_matches_reference_backend(monkeypatch, paged_kv: bool) -> None:
    """Dropout with varlen draws the mask at (sequence * hq + head, position in the sequence, key
    position): the same out, lse and gradients as the reference backend, which draws it the same way."""
    (q, k, v), a = _dropout_args(torch.Generator().manual_seed(20), paged_kv)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=torch.Generator().manual_seed(21))

    def run():
        out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    ours = run()
    monkeypatch.setenv("FLEXATTN_BACKEND", "reference")
    ref = run()
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        tv.assert_rel_close(name, x, y, rtol=2e-5, atol=1e-5)


def test_backward_bitwise_reproducible() -> None:
    """Shared pages, hk != hv and dropout: two backward passes give identical bits."""
    (q, k, v), a = _dropout_args(torch.Generator().manual_seed(22), True)
    a = a._replace(block_table=a.block_table.clone())
    a.block_table[1:, 0] = a.block_table[0, 0]  # every sequence also reads the first sequence's first page
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=torch.Generator().manual_seed(23))
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    first = torch.ops.flexattn.bwd(dout, q, k, v, out, lse, *a, False)
    second = torch.ops.flexattn.bwd(dout, q, k, v, out, lse, *a, False)
    for x, y in zip(first[:3], second[:3], strict=True):
        assert torch.equal(x, y)


def test_never_syncs_host() -> None:
    """Forward and backward, packed and paged, with no host read of a tensor or data-dependent shape."""
    tv.test_varlen_never_syncs_host()


@pytest.mark.parametrize("layout,paged_kv", [("contiguous", True), ("sliced", False), ("permuted", True)])
def test_opcheck_varlen(layout: str, paged_kv: bool) -> None:
    """opcheck (schema, fake, autograd registration) of fwd and bwd with varlen inputs on Triton."""
    assert dispatch.requested_backend() == "triton"
    tv.test_opcheck_varlen(layout, paged_kv)


@pytest.mark.parametrize("seed", [0, 3, 6])
def test_random_feature_combinations(seed: int) -> None:
    """tests/test_varlen.py's random lengths, heads, masks, score mods, seqused_k and pages, on Triton."""
    tv.test_random_feature_combinations(seed)
