"""flash_attn_with_kvcache, torch.ops.flexattn.fwd_kvcache and torch.ops.flexattn.combine on the
reference backend: against the per-sequence float64 oracle (`testing.kvcache_ref`), the in-place
append (and nothing written elsewhere), opcheck, no host synchronisation, compile and export."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import flexattn_ops
from flexattn_ops import flash_attn_with_kvcache, reference
from flexattn_ops.params import AttnArgs, KVCacheArgs
from flexattn_ops.testing import NoHostSync, assert_close_to_oracle, assert_rel_close, kvcache_ref

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("FLEXATTN_BACKEND", "reference")


@dataclass
class Case:
    """One flash_attn_with_kvcache call: tensors plus the Python-list view the oracle takes."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    seqlens: list[int]
    leftpad: Optional[list[int]] = None
    batch_idx: Optional[list[int]] = None
    block_table: Optional[torch.Tensor] = None
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    kwargs: dict = field(default_factory=dict)

    def tensor(self, xs: Optional[list[int]]) -> Optional[torch.Tensor]:
        return None if xs is None else torch.tensor(xs, dtype=torch.int32)

    def run(self, **extra):
        """Our result on copies of the caches: (out, lse, k_cache, v_cache)."""
        kc, vc = self.k_cache.clone(), self.v_cache.clone()
        cos, sin = self.rotary if self.rotary is not None else (None, None)
        out, lse = flash_attn_with_kvcache(
            self.q,
            kc,
            vc,
            self.k,
            self.v,
            rotary_cos=cos,
            rotary_sin=sin,
            cache_seqlens=self.tensor(self.seqlens),
            cache_batch_idx=self.tensor(self.batch_idx),
            cache_leftpad=self.tensor(self.leftpad),
            block_table=self.block_table,
            return_softmax_lse=True,
            **{**self.kwargs, **extra},
        )
        return out, lse, kc, vc

    def oracle(self, compute_dtype=torch.float64):
        cos, sin = self.rotary if self.rotary is not None else (None, None)
        kwargs = {key: val for key, val in self.kwargs.items() if key != "num_splits"}
        return kvcache_ref(
            self.q,
            self.k_cache,
            self.v_cache,
            self.k,
            self.v,
            rotary_cos=cos,
            rotary_sin=sin,
            cache_seqlens=self.seqlens,
            cache_batch_idx=self.batch_idx,
            cache_leftpad=self.leftpad,
            block_table=self.block_table,
            compute_dtype=compute_dtype,
            **kwargs,
        )


def make_case(
    *,
    b: int = 3,
    sq: int = 1,
    heads: tuple[int, int, int] = (4, 2, 1),
    dims: tuple[int, int] = (16, 12),
    cache_len: int = 19,
    s_new: int = 1,
    dtype: torch.dtype = torch.float32,
    page: Optional[int] = None,
    leftpad: bool = False,
    batch_idx: bool = False,
    rotary_dim: Optional[int] = None,
    seed: int = 0,
    **kwargs,
) -> Case:
    """Random inputs (never zeros); caches filled with random values so untouched slots are checked.

    Paged caches get `ceil(cache_len / page)` pages per sequence drawn from a shuffled pool with
    spare pages, so no sequence's pages are contiguous or in order."""
    g = torch.Generator().manual_seed(seed)
    hq, hk, hv = heads
    dqk, dv = dims

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    pad = [int(x) for x in torch.randint(0, 4, (b,), generator=g)] if leftpad else [0] * b
    # Lengths from leftpad up to the room left for s_new; the first sequence is as full as can be.
    seqlens = [int(torch.randint(pad[i], cache_len - s_new + 1, (1,), generator=g)) for i in range(b)]
    seqlens[0] = cache_len - s_new
    block_table = None
    if page is not None:
        blocks = -(-cache_len // page)
        pool = b * blocks + 3
        block_table = torch.randperm(pool, generator=g)[: b * blocks].reshape(b, blocks).to(torch.int32)
        k_cache, v_cache = rnd(pool, page, hk, dqk), rnd(pool, page, hv, dv)
    else:
        b_cache = b + 2 if batch_idx else b
        k_cache, v_cache = rnd(b_cache, cache_len, hk, dqk), rnd(b_cache, cache_len, hv, dv)
    rows = [int(x) for x in torch.randperm(b + 2, generator=g)[:b]] if batch_idx else None
    k = rnd(b, s_new, hk, dqk) if s_new else None
    v = rnd(b, s_new, hv, dv) if s_new else None
    rotary = None
    if rotary_dim is not None:
        seqlen_ro = (block_table.shape[1] * page if page is not None else cache_len) + 5
        angle = torch.rand(seqlen_ro, rotary_dim // 2, generator=g, dtype=torch.float64) * 2 * math.pi
        rotary = (angle.cos().to(dtype), angle.sin().to(dtype))
    return Case(
        rnd(b, sq, hq, dqk),
        k_cache,
        v_cache,
        k,
        v,
        seqlens,
        pad if leftpad else None,
        rows,
        block_table,
        rotary,
        kwargs,
    )


def check(case: Case, **extra) -> None:
    """Out, lse and both caches against the oracle; fp32 to 1e-5 relative, bf16 by the baseline rule."""
    out, lse, kc, vc = case.run(**extra)
    ref_out, ref_lse, ref_kc, ref_vc = case.oracle()
    assert out.dtype == case.q.dtype and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()
    if case.q.dtype == torch.float32:
        assert_rel_close("out", out, ref_out)
        assert_rel_close("lse", lse, ref_lse)
    else:
        base_out, base_lse, _, _ = case.oracle(compute_dtype=case.q.dtype)
        assert_close_to_oracle("out", out, ref_out, base_out)
        assert_close_to_oracle("lse", lse, ref_lse, base_lse)
    if case.rotary is None:
        # Appending copies values: bitwise, and every other slot keeps its old value.
        assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)
    else:
        torch.testing.assert_close(kc, ref_kc)
        assert torch.equal(vc, ref_vc)


# ---------------------------------------------------------------------------------------------
# Against the oracle


@pytest.mark.parametrize("s_new", [0, 1, 5])
@pytest.mark.parametrize("page", [None, 1, 3, 16, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_and_attend(dtype, page, s_new):
    """Dense and paged caches (page sizes 1, 3, 16, 256), GQA with hk != hv and dqk != dv."""
    cache_len = 300 if page == 256 else 23
    case = make_case(dtype=dtype, page=page, s_new=s_new, sq=max(s_new, 1), cache_len=cache_len, causal=True)
    check(case)


@pytest.mark.parametrize(
    "mask",
    [
        {},
        {"causal": True},
        {"window_size": (3, 1)},
        {"window_size": (-1, 0)},
        {"window_size": (2, -1)},
        {"softcap": 0.7},
        {"alibi": "head"},
        {"alibi": "batch"},
        {"sinks": True},
        {"causal": True, "softcap": 1.5, "alibi": "batch", "sinks": True},
    ],
    ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()) or "none",
)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("page", [None, 3])
def test_masks_and_score_mods(mask, num_splits, page):
    """Sq > 1 so the bottom-right aligned masks differ per row; splits merge with sinks added once."""
    g = torch.Generator().manual_seed(1)
    case = make_case(sq=4, s_new=2, page=page, num_splits=num_splits, seed=2)
    for key, val in mask.items():
        if key == "alibi":
            shape = (4,) if val == "head" else (3, 4)
            case.kwargs["alibi_slopes"] = torch.rand(shape, generator=g) + 0.1
        elif key == "sinks":
            case.kwargs["sinks"] = torch.randn(4, generator=g)
        else:
            case.kwargs[key] = val
    check(case)


def test_alibi_per_batch_and_sq_longer_than_keys():
    """Per-batch ALiBi slopes; with sq > keys, causal rows before the first key give out 0, lse -inf."""
    g = torch.Generator().manual_seed(3)
    case = make_case(sq=6, s_new=2, cache_len=9, causal=True, seed=3)
    case.seqlens = [3, 0, 7]
    case.kwargs["alibi_slopes"] = torch.rand(3, 4, generator=g) + 0.1
    check(case)
    out, lse, _, _ = case.run()
    assert torch.isneginf(lse[1, :, :4]).all() and (out[1, :4] == 0).all()


@pytest.mark.parametrize("page", [None, 16])
@pytest.mark.parametrize("leftpad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8, 2])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary(interleaved, rotary_dim, causal, leftpad, page):
    """Rotary on q and new k (interleaved and GPT-NeoX, partial rotary_dim), positions shifted by leftpad;
    without causal/local every query sits at position cache_seqlens - leftpad."""
    case = make_case(
        sq=3,
        s_new=3,
        rotary_dim=rotary_dim,
        leftpad=leftpad,
        page=page,
        causal=causal,
        rotary_interleaved=interleaved,
        seed=rotary_dim + 10 * page if page else rotary_dim,
    )
    check(case)


@pytest.mark.parametrize("seed", range(12))
def test_random_feature_combinations(seed):
    """Every feature at once in random combinations: interactions (rotary x leftpad x pages x splits x
    masks x heads) that the one-feature tests above do not reach."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    hq, hk, hv = pick([(4, 2, 1), (6, 3, 2), (2, 2, 2), (8, 1, 4)])
    dqk, dv = pick([(16, 16), (24, 8), (8, 40)])
    s_new = pick([0, 1, 4])
    page = pick([None, 1, 3, 16, 256])
    kwargs = {"causal": pick([False, True]), "num_splits": pick([0, 1, 2, 7])}
    if pick([False, True]):
        kwargs["window_size"] = (pick([-1, 0, 3]), pick([-1, 0, 2]))
    if pick([False, True]):
        kwargs["softcap"] = 1.3
    if pick([False, True]):
        kwargs["alibi_slopes"] = torch.rand(pick([(hq,), (3, hq)]), generator=g) + 0.1
    if pick([False, True]):
        kwargs["sinks"] = torch.randn(hq, generator=g)
    case = make_case(
        heads=(hq, hk, hv),
        dims=(dqk, dv),
        sq=pick([1, 2, 5]),
        s_new=s_new,
        page=page,
        cache_len=pick([9, 40]) if page != 256 else 300,
        leftpad=pick([False, True]),
        batch_idx=page is None and pick([False, True]),
        rotary_dim=pick([None, 8]) if s_new else None,
        dtype=pick(DTYPES),
        rotary_interleaved=pick([False, True]),
        seed=seed,
        **kwargs,
    )
    check(case)


@pytest.mark.parametrize("page", [None, 16])
def test_float16(page):
    check(make_case(sq=3, s_new=2, page=page, dtype=torch.float16, causal=True, rotary_dim=8, num_splits=2))


def test_rotary_bf16_and_local_window():
    check(make_case(sq=2, s_new=2, rotary_dim=12, dtype=torch.bfloat16, window_size=(4, 0), leftpad=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [None, 3])
def test_leftpad(dtype, page):
    check(make_case(sq=2, s_new=2, leftpad=True, page=page, dtype=dtype, causal=True, alibi_slopes=torch.rand(4)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_batch_idx(dtype):
    """Sequences read and write cache rows cache_batch_idx (a larger cache, rows shuffled)."""
    case = make_case(sq=2, s_new=2, batch_idx=True, dtype=dtype, causal=True, rotary_dim=8)
    check(case)
    _, _, kc, _ = case.run()
    unused = sorted(set(range(case.k_cache.shape[0])) - set(case.batch_idx or []))
    assert torch.equal(kc[unused], case.k_cache[unused])


@pytest.mark.parametrize(
    "heads,dims",
    [((4, 4, 4), (32, 32)), ((8, 1, 1), (16, 16)), ((6, 3, 2), (24, 40)), ((4, 2, 4), (8, 64)), ((3, 1, 3), (5, 7))],
)
@pytest.mark.parametrize("page", [None, 1])
def test_heads_and_dims(heads, dims, page):
    check(make_case(heads=heads, dims=dims, page=page, sq=2, s_new=1, causal=True))


def test_no_new_keys_full_cache():
    """No k/v and no cache_seqlens: attend to the whole cache, change nothing."""
    case = make_case(s_new=0, sq=3)
    case.seqlens = [case.k_cache.shape[1]] * 3
    out, lse, kc, vc = case.run()
    out2, lse2 = flash_attn_with_kvcache(case.q, kc, vc, return_softmax_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    check(case)


def test_empty_sequences_give_zero_and_neg_inf():
    case = make_case(s_new=0, sq=2)
    case.seqlens = [0, 5, 0]
    out, lse, _, _ = case.run()
    assert not out.isnan().any() and (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    check(case)


def test_larger_cache_than_batch():
    """As in flash-attn, a cache with more rows than the batch: sequence i uses row i, the rest stay."""
    case = make_case(sq=2, s_new=2, batch_idx=True, causal=True)
    case.batch_idx = None  # the cache has b + 2 rows
    check(case)
    _, _, kc, vc = case.run()
    assert torch.equal(kc[3:], case.k_cache[3:]) and torch.equal(vc[3:], case.v_cache[3:])


def test_int_cache_seqlens_and_return_values():
    case = make_case(s_new=2, sq=2)
    case.seqlens = [7, 7, 7]
    out_t, lse_t, kc_t, _ = case.run()
    kc, vc = case.k_cache.clone(), case.v_cache.clone()
    out = flash_attn_with_kvcache(case.q, kc, vc, case.k, case.v, cache_seqlens=7)
    assert isinstance(out, torch.Tensor) and torch.equal(out, out_t) and torch.equal(kc, kc_t)
    res = flash_attn_with_kvcache(case.q, kc, vc, cache_seqlens=9, return_softmax_lse=True)
    assert isinstance(res, tuple) and len(res) == 2 and torch.equal(res[1], lse_t)


# ---------------------------------------------------------------------------------------------
# num_splits and combine


@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 4096])
@pytest.mark.parametrize("sinks", [False, True])
def test_num_splits(num_splits, sinks, monkeypatch):
    """Every split count gives the oracle's answer; more than one split really goes through combine."""
    calls = []
    real = reference.combine

    def counting(out_partial, lse_partial):
        calls.append(out_partial.shape[0])
        return real(out_partial, lse_partial)

    monkeypatch.setattr(reference, "combine", counting)
    case = make_case(cache_len=1100, s_new=3, sq=3, causal=True, num_splits=num_splits, page=16, seed=5)
    if sinks:
        case.kwargs["sinks"] = torch.randn(4)
    check(case)
    cache_len = case.block_table.shape[1] * 16
    expected = reference.num_splits_for(num_splits, cache_len)
    assert expected == {0: 3, 1: 1, 2: 2, 5: 5, 4096: cache_len}[num_splits]
    assert calls == ([expected] if expected > 1 else [])


def _combine_oracle(out_partial, lse_partial):
    lse = torch.logsumexp(lse_partial.double(), dim=0)
    w = torch.softmax(lse_partial.double(), dim=0).nan_to_num(0.0)
    out = (w[..., None] * out_partial.double().nan_to_num(0.0)).sum(0)
    return out, lse


def test_combine_matches_logsumexp():
    g = torch.Generator().manual_seed(0)
    out_p = torch.randn(4, 3, 5, 2, 7, generator=g)
    lse_p = torch.randn(4, 3, 5, 2, generator=g) * 3
    lse_p[1, 0] = float("-inf")  # one split without keys for some rows
    lse_p[:, 2, 1] = float("-inf")  # rows without any key
    out_p[1, 0] = float("nan")  # a dead split's output must not leak
    out, lse = torch.ops.flexattn.combine(out_p, lse_p)
    ref_out, ref_lse = _combine_oracle(out_p, lse_p)
    assert out.dtype == lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[2, 1] == 0).all() and torch.isneginf(lse[2, 1]).all()
    assert_rel_close("out", out, ref_out)
    assert_rel_close("lse", lse, ref_lse)


def test_combine_bf16_partials_merge_in_fp32():
    g = torch.Generator().manual_seed(1)
    out_p = torch.randn(3, 6, 8, generator=g).bfloat16()
    lse_p = torch.randn(3, 6, generator=g)
    out, _ = torch.ops.flexattn.combine(out_p, lse_p)
    ref_out, _ = _combine_oracle(out_p, lse_p)
    assert out.dtype == torch.float32
    assert_rel_close("out", out, ref_out)


def test_combine_of_key_chunks_is_full_attention():
    """What ring attention relies on: fwd over disjoint key chunks, merged, equals fwd over all keys."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 5, 4, 16, generator=g) for _ in range(3))
    k, v = torch.randn(2, 13, 2, 16, generator=g), torch.randn(2, 13, 1, 8, generator=g)
    a = AttnArgs(softmax_scale=0.25, softcap=2.0)
    full_out, full_lse = torch.ops.flexattn.fwd(q, k, v, *a)
    outs, lses = [], []
    for cols in (slice(0, 4), slice(4, 5), slice(5, 13)):
        o, lse = torch.ops.flexattn.fwd(q, k[:, cols].contiguous(), v[:, cols].contiguous(), *a)
        outs.append(o)
        lses.append(lse.transpose(1, 2))
    out, lse = torch.ops.flexattn.combine(torch.stack(outs), torch.stack(lses))
    assert_rel_close("out", out, full_out)
    assert_rel_close("lse", lse.transpose(1, 2), full_lse)


def test_combine_backward():
    """Autograd through combine equals autograd through the float64 formula (zero where -inf)."""
    g = torch.Generator().manual_seed(3)
    out_p = torch.randn(3, 4, 2, 5, generator=g)
    lse_p = torch.randn(3, 4, 2, generator=g)
    lse_p[0, 1] = float("-inf")
    lse_p[:, 3] = float("-inf")
    dout, dlse = torch.randn(4, 2, 5, generator=g), torch.randn(4, 2, generator=g)
    x, y = out_p.clone().requires_grad_(), lse_p.clone().requires_grad_()
    out, lse = torch.ops.flexattn.combine(x, y)
    live = torch.isfinite(lse).detach()
    ((out * dout).sum() + (lse.where(live, 0.0) * dlse).sum()).backward()
    xd, yd = out_p.double().requires_grad_(), lse_p.double().requires_grad_()
    safe = yd.where(torch.isfinite(yd), -1e30)
    ref_lse = torch.logsumexp(safe, 0)
    weights = torch.softmax(safe, 0) * torch.isfinite(yd)  # rows without any key: no weight at all
    ref_out = (weights[..., None] * xd).sum(0)
    ((ref_out * dout).sum() + (ref_lse.where(live, 0.0) * dlse).sum()).backward()
    assert not x.grad.isnan().any() and not y.grad.isnan().any()
    assert_rel_close("d_out_partial", x.grad, xd.grad)
    assert_rel_close("d_lse_partial", y.grad, yd.grad)


# ---------------------------------------------------------------------------------------------
# opcheck


def _kvcache_op_args(layout: str, paged: bool):
    case = make_case(sq=2, s_new=2, page=3 if paged else None, rotary_dim=8, leftpad=not paged, seed=7)
    q, k_cache, v_cache, k, v = case.q, case.k_cache, case.v_cache, case.k, case.v
    if layout == "permuted":
        # Caches allocated head-major (n, h, s, d) and viewed as (n, s, h, d): stride(-1) stays 1.
        k_cache = k_cache.transpose(1, 2).contiguous().transpose(1, 2)
        v_cache = v_cache.transpose(1, 2).contiguous().transpose(1, 2)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":
        k_cache = torch.cat([k_cache, k_cache[..., :5]], dim=-1)[..., :16]
        v_cache = torch.cat([v_cache, v_cache], dim=2)[:, :, ::2]
        q = torch.cat([q, q], dim=-1)[..., :16]
    cos, sin = case.rotary
    c = KVCacheArgs(
        k,
        v,
        cos,
        sin,
        case.tensor(case.seqlens),
        None,
        case.tensor(case.leftpad),
        case.block_table,
        0.3,
        -1,
        0,
        0.0,
        True,
        torch.rand(4),
        torch.randn(4),
        2,
    )
    return [q, k_cache, v_cache, *c]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
def test_opcheck_fwd_kvcache(layout, paged, requires_grad):
    args = _kvcache_op_args(layout, paged)
    if requires_grad:
        for i in (0, 3, 4):  # q, k, v (the caches are written in place: leaves can't require grad)
            args[i].requires_grad_()
    torch.library.opcheck(torch.ops.flexattn.fwd_kvcache.default, tuple(args))
    if requires_grad:
        out, lse = torch.ops.flexattn.fwd_kvcache(*args)
        assert not out.requires_grad and not lse.requires_grad  # no backward, as flash-attn's


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
def test_opcheck_combine(layout, requires_grad):
    g = torch.Generator().manual_seed(4)
    out_p = torch.randn(3, 2, 5, 4, 8, generator=g)
    lse_p = torch.randn(3, 2, 5, 4, generator=g)
    lse_p[1, 0, 2] = float("-inf")
    if layout == "permuted":
        out_p = out_p.transpose(2, 3).contiguous().transpose(2, 3)
        lse_p = lse_p.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        out_p, lse_p = out_p[:, :, 1:], lse_p[:, :, 1:]
    torch.library.opcheck(
        torch.ops.flexattn.combine.default,
        (out_p.requires_grad_(requires_grad), lse_p.requires_grad_(requires_grad)),
    )
    out, lse = torch.ops.flexattn.combine(out_p, lse_p)
    assert out.is_contiguous() and lse.is_contiguous()  # what the fake promises


# ---------------------------------------------------------------------------------------------
# No host synchronisation; compile and export


def test_no_sync_mode_catches_item():
    """The mode sees .item() and data-dependent shapes; .tolist() on CPU bypasses the dispatcher, which
    is why the compiled tests below also trace with fullgraph=True and scalar capture off."""
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        torch.ones(2).sum().item()
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        torch.ones(3).repeat_interleave(torch.tensor([1, 2, 0]))


@pytest.mark.parametrize("paged", [False, True])
def test_ops_never_sync_host(paged):
    args = _kvcache_op_args("contiguous", paged)
    with NoHostSync():
        torch.ops.flexattn.fwd_kvcache(*args)
        torch.ops.flexattn.combine(torch.randn(2, 3, 4), torch.randn(2, 3))


def _decode_step(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cos, sin):
    out = flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=cache_seqlens,
        block_table=block_table,
        causal=True,
        num_splits=2,
    )
    return out * 2.0


@pytest.mark.parametrize("backend,mode", [("aot_eager", None), ("inductor", None), ("inductor", "reduce-overhead")])
def test_compiled_decode_step_updates_cache(backend, mode, inductor_cache, monkeypatch):
    """fullgraph with scalar capture off: any .item()/.tolist() would break the graph and fail.
    Three decode steps (new cache_seqlens values, same graph: no recompilation); the compiled
    caches equal the eager ones after each. (reduce-overhead on CPU runs without CUDA graphs.)"""
    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", False)
    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", False)
    case = make_case(sq=1, s_new=1, page=3, rotary_dim=8, seed=9)
    compiled = torch.compile(_decode_step, fullgraph=True, backend=backend, mode=mode)
    kc_e, vc_e = case.k_cache.clone(), case.v_cache.clone()
    kc_c, vc_c = case.k_cache.clone(), case.v_cache.clone()
    seqlens = case.tensor(case.seqlens)
    cos, sin = case.rotary
    for step in range(3):
        k, v = case.k + step, case.v - step
        ref = _decode_step(case.q, kc_e, vc_e, k, v, seqlens + step, case.block_table, cos, sin)
        with torch.compiler.set_stance("fail_on_recompile" if step else "default"):
            out = compiled(case.q, kc_c, vc_c, k, v, seqlens + step, case.block_table, cos, sin)
        torch.testing.assert_close(out, ref)
        assert torch.equal(vc_c, vc_e)
        torch.testing.assert_close(kc_c, kc_e)
    assert not torch.equal(vc_c, case.v_cache)


def test_compiled_module_updates_cache_buffers(inductor_cache):
    """A module holding its cache in buffers, compiled: the buffers are updated like eager ones."""
    torch.manual_seed(1)
    block, eager = DecoderBlock().eval(), DecoderBlock().eval()
    eager.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    initial = block.v_cache.clone()
    with torch.no_grad():
        for step in range(2):
            x, seqlens = torch.randn(2, 1, 32), torch.tensor([3 + step, 9 + step], dtype=torch.int32)
            torch.testing.assert_close(compiled(x, seqlens), eager(x, seqlens))
    assert torch.equal(block.k_cache, eager.k_cache) and torch.equal(block.v_cache, eager.v_cache)
    changed = (block.v_cache != initial).any(-1).any(-1)  # (batch, slot): slots 3, 4 and 9, 10 written
    assert changed.nonzero().tolist() == [[0, 3], [0, 4], [1, 9], [1, 10]]


class DecoderBlock(torch.nn.Module):
    """A tiny attention block whose KV cache lives in module buffers."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2, batch: int = 2, max_len: int = 16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = torch.nn.Linear(dim, dim)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.wo = torch.nn.Linear(dim, dim)
        self.register_buffer("k_cache", torch.randn(batch, max_len, kv_heads, self.head_dim))
        self.register_buffer("v_cache", torch.randn(batch, max_len, kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k, v = self.wkv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        out = flash_attn_with_kvcache(q, self.k_cache, self.v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)
        return self.wo(out.reshape(b, s, -1))


def test_export_decoder_block_mutates_cache_buffers():
    torch.manual_seed(0)
    block = DecoderBlock().eval()
    eager = DecoderBlock().eval()
    eager.load_state_dict(block.state_dict())
    x, seqlens = torch.randn(2, 1, 32), torch.tensor([3, 9], dtype=torch.int32)
    with torch.no_grad():
        # export keeps the in-place op; functionalising (run_decompositions) turns the mutation into
        # graph outputs written back to the buffers, which the signature lists.
        ep = torch.export.export(block, (x, seqlens))
        assert torch.ops.flexattn.fwd_kvcache.default in [n.target for n in ep.graph.nodes]
        ep = ep.run_decompositions({})
    assert set(ep.graph_signature.buffers_to_mutate.values()) == {"k_cache", "v_cache"}
    wrapped = [n.args[0] for n in ep.graph.nodes if n.op == "call_function" and "auto_functionalized" in str(n.target)]
    assert wrapped == [torch.ops.flexattn.fwd_kvcache.default]
    module = ep.module()
    before = module.k_cache.clone()
    with torch.no_grad():
        out = module(x, seqlens)
        ref = eager(x, seqlens)
    torch.testing.assert_close(out, ref)
    assert not torch.equal(module.k_cache, before)
    assert torch.equal(module.k_cache, eager.k_cache) and torch.equal(module.v_cache, eager.v_cache)


# ---------------------------------------------------------------------------------------------
# Validation (SPEC section 6): each bad argument raises naming it


def _valid_call_kwargs(paged: bool = False):
    case = make_case(sq=2, s_new=2, page=3 if paged else None, rotary_dim=8, seed=11)
    cos, sin = case.rotary
    return dict(
        q=case.q,
        k_cache=case.k_cache,
        v_cache=case.v_cache,
        k=case.k,
        v=case.v,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=case.tensor(case.seqlens),
        block_table=case.block_table,
    )


def _bad(**changes):
    return changes


BAD = [
    ("q_rank", _bad(q=lambda kw: kw["q"][0]), ValueError, "q: expected a 4-d"),
    ("q_dtype", _bad(q=lambda kw: kw["q"].double()), TypeError, "q: expected dtype"),
    ("k_cache_dtype", _bad(k_cache=lambda kw: kw["k_cache"].half()), TypeError, "k_cache: expected the dtype of q"),
    ("k_cache_rank", _bad(k_cache=lambda kw: kw["k_cache"][0]), ValueError, "k_cache: expected a 4-d"),
    (
        "k_cache_stride",
        _bad(k_cache=lambda kw: kw["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
        ValueError,
        "k_cache: expected a cache with a contiguous last dimension",
    ),
    ("v_cache_len", _bad(v_cache=lambda kw: kw["v_cache"][:, :-1]), ValueError, "v_cache: expected the leading shape"),
    ("k_cache_dim", _bad(k_cache=lambda kw: kw["k_cache"][..., :8]), ValueError, "k_cache: expected head dim 16"),
    (
        "k_cache_heads",
        _bad(k_cache=lambda kw: kw["k_cache"][:, :, :1].expand(-1, -1, 3, -1).contiguous()),
        ValueError,
        "k: expected a number of heads dividing",
    ),
    (
        "cache_batch",
        _bad(k_cache=lambda kw: kw["k_cache"][:2], v_cache=lambda kw: kw["v_cache"][:2]),
        ValueError,
        "k_cache: expected at least 3 rows",
    ),
    ("k_without_v", _bad(v=lambda kw: None), ValueError, "k/v: expected both"),
    ("k_shape", _bad(k=lambda kw: kw["k"][:, :, :, :8]), ValueError, "k: expected shape"),
    ("v_len", _bad(v=lambda kw: kw["v"][:, :1]), ValueError, "v: expected shape"),
    ("k_dtype", _bad(k=lambda kw: kw["k"].half()), TypeError, "k: expected the dtype of q"),
    (
        "k_longer_than_cache",
        _bad(k=lambda kw: kw["k"].repeat(1, 10, 1, 1), v=lambda kw: kw["v"].repeat(1, 10, 1, 1)),
        ValueError,
        "k: expected at most 19 new keys",
    ),
    (
        "seqlens_dtype",
        _bad(cache_seqlens=lambda kw: kw["cache_seqlens"].long()),
        TypeError,
        "cache_seqlens: expected an int32",
    ),
    (
        "seqlens_shape",
        _bad(cache_seqlens=lambda kw: kw["cache_seqlens"][:2]),
        ValueError,
        r"cache_seqlens: expected shape \(3,\)",
    ),
    (
        "seqlens_rank",
        _bad(cache_seqlens=lambda kw: kw["cache_seqlens"][None]),
        ValueError,
        "cache_seqlens: expected a 1-d",
    ),
    ("seqlens_missing", _bad(cache_seqlens=lambda kw: None), ValueError, "cache_seqlens: expected an int or"),
    (
        "batch_idx_dtype",
        _bad(cache_batch_idx=lambda kw: torch.arange(3)),
        TypeError,
        "cache_batch_idx: expected an int32",
    ),
    (
        "batch_idx_shape",
        _bad(cache_batch_idx=lambda kw: torch.arange(4, dtype=torch.int32)),
        ValueError,
        r"cache_batch_idx: expected shape \(3,\)",
    ),
    (
        "leftpad_dtype",
        _bad(cache_leftpad=lambda kw: torch.zeros(3, dtype=torch.int16)),
        TypeError,
        "cache_leftpad: expected an int32",
    ),
    (
        "leftpad_shape",
        _bad(cache_leftpad=lambda kw: torch.zeros(2, dtype=torch.int32)),
        ValueError,
        r"cache_leftpad: expected shape \(3,\)",
    ),
    ("cos_only", _bad(rotary_sin=lambda kw: None), ValueError, "rotary_cos/rotary_sin: expected both"),
    ("rotary_without_k", _bad(k=lambda kw: None, v=lambda kw: None), ValueError, "k/v: expected new k and v"),
    (
        "rotary_dim",
        _bad(rotary_cos=lambda kw: torch.rand(40, 9), rotary_sin=lambda kw: torch.rand(40, 9)),
        ValueError,
        "rotary_cos: expected rotary_dim / 2 columns",
    ),
    (
        "rotary_short",
        _bad(rotary_cos=lambda kw: kw["rotary_cos"][:5], rotary_sin=lambda kw: kw["rotary_sin"][:5]),
        ValueError,
        "rotary_cos: expected at least 19 rows",
    ),
    (
        "rotary_sin_shape",
        _bad(rotary_sin=lambda kw: kw["rotary_sin"][:, :2]),
        ValueError,
        "rotary_sin: expected the shape of rotary_cos",
    ),
    (
        "rotary_dtype",
        _bad(rotary_cos=lambda kw: kw["rotary_cos"].double()),
        TypeError,
        "rotary_cos: expected the dtype of q",
    ),
    (
        "rotary_rank",
        _bad(rotary_cos=lambda kw: kw["rotary_cos"][None], rotary_sin=lambda kw: kw["rotary_sin"][None]),
        ValueError,
        "rotary_cos: expected a 2-d",
    ),
    ("window", _bad(window_size=lambda kw: (-2, 0)), ValueError, r"window_size\[0\]"),
    ("softcap", _bad(softcap=lambda kw: -1.0), ValueError, "softcap: expected a float >= 0"),
    ("num_splits", _bad(num_splits=lambda kw: -1), ValueError, "num_splits: expected an int >= 0"),
    ("alibi_shape", _bad(alibi_slopes=lambda kw: torch.rand(3)), ValueError, "alibi_slopes: expected shape"),
    ("sinks_shape", _bad(sinks=lambda kw: torch.rand(2)), ValueError, "sinks: expected shape"),
]


@pytest.mark.parametrize("name,changes,exc,match", BAD, ids=[b[0] for b in BAD])
def test_validation(name, changes, exc, match):
    kw = _valid_call_kwargs()
    kw.update({key: fn(kw) for key, fn in changes.items()})
    kc_before = kw["k_cache"].clone()
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**kw)
    assert torch.equal(kw["k_cache"], kc_before), "a rejected call must not touch the cache"


BAD_PAGED = [
    ("table_dtype", _bad(block_table=lambda kw: kw["block_table"].long()), TypeError, "block_table: expected an int32"),
    ("table_rank", _bad(block_table=lambda kw: kw["block_table"][0]), ValueError, "block_table: expected a 2-d"),
    ("table_rows", _bad(block_table=lambda kw: kw["block_table"][:2]), ValueError, "block_table: expected 3 rows"),
    (
        "batch_idx_with_pages",
        _bad(cache_batch_idx=lambda kw: torch.arange(3, dtype=torch.int32)),
        ValueError,
        "cache_batch_idx: expected None with a paged cache",
    ),
    (
        "paged_rotary_short",
        _bad(rotary_cos=lambda kw: kw["rotary_cos"][:20], rotary_sin=lambda kw: kw["rotary_sin"][:20]),
        ValueError,
        "rotary_cos: expected at least 21 rows",
    ),
]


@pytest.mark.parametrize("name,changes,exc,match", BAD_PAGED, ids=[b[0] for b in BAD_PAGED])
def test_validation_paged(name, changes, exc, match):
    kw = _valid_call_kwargs(paged=True)
    kw.update({key: fn(kw) for key, fn in changes.items()})
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**kw)


@pytest.mark.parametrize(
    "out_p,lse_p,exc,match",
    [
        (torch.randn(2, 3, 4), torch.randn(2, 3).double(), TypeError, "lse_partial: expected dtype"),
        (torch.randn(2, 3, 4).long(), torch.randn(2, 3), TypeError, "out_partial: expected dtype"),
        (torch.randn(2, 3, 4), torch.randn(2, 4), ValueError, r"lse_partial: expected shape \(2, 3\)"),
        (torch.randn(3), torch.randn(3), ValueError, "out_partial: expected a tensor"),
        (torch.randn(0, 3, 4), torch.randn(0, 3), ValueError, "out_partial: expected at least one split"),
    ],
)
def test_combine_validation(out_p, lse_p, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.flexattn.combine(out_p, lse_p)


def test_backend_reports():
    from flexattn_ops import dispatch

    q = torch.randn(1, 1, 2, 8)
    assert dispatch.explain("fwd_kvcache", q, q, q, AttnArgs()).selected == "reference"
    assert dispatch.explain("combine", q, q, q, AttnArgs()).selected == "reference"
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.explain("fwd_kvcach", q, q, q, AttnArgs())
    assert "flash_attn_with_kvcache" in flexattn_ops.__all__
