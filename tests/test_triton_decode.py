"""`fwd_kvcache` and `combine` on the Triton backend under TRITON_INTERPRET=1, on small CPU tensors.

Mirrors tests/test_kvcache.py (the reference backend's tests, whose `Case`/`make_case`/`check` are reused:
out and lse against the per-sequence float64 oracle, and the caches after the call equal to the oracle's,
bitwise where no rotary is involved), with FLEXATTN_BACKEND=triton. Outputs are poisoned: under
deterministic algorithms torch fills fresh memory with NaN, so an element the kernels forget to write
(final or partial) shows up. The interpreter runs tiles of 16 keys, so caches of 19..300 slots cover
several tiles, the unmasked middle loop, partial tiles and pages smaller and larger than a tile.
"""

from __future__ import annotations

import os

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from flexattn_ops import dispatch  # noqa: E402
from flexattn_ops.params import AttnArgs  # noqa: E402
from flexattn_ops.testing import assert_rel_close  # noqa: E402
from tests import test_kvcache as reference_tests  # noqa: E402
from tests.test_kvcache import _combine_oracle, _kvcache_op_args, check, make_case  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("triton_backend_poisoned"),
]

DTYPES = [torch.float32, torch.bfloat16]

# The reference backend's tests that need nothing Triton-specific, collected again here, where this
# module's pytestmark runs them on the Triton backend.
test_alibi_per_batch_and_sq_longer_than_keys = reference_tests.test_alibi_per_batch_and_sq_longer_than_keys
test_masks_and_score_mods = reference_tests.test_masks_and_score_mods
test_append_and_attend = reference_tests.test_append_and_attend
test_heads_and_dims = reference_tests.test_heads_and_dims
test_rotary = reference_tests.test_rotary
test_cache_batch_idx = reference_tests.test_cache_batch_idx
test_combine_bf16_partials_merge_in_fp32 = reference_tests.test_combine_bf16_partials_merge_in_fp32
test_leftpad = reference_tests.test_leftpad
test_no_new_keys_full_cache = reference_tests.test_no_new_keys_full_cache
test_ops_never_sync_host = reference_tests.test_ops_never_sync_host


@pytest.fixture
def combine_calls(monkeypatch):
    """Counts launches of the Triton combine kernel (i.e. calls that really split the keys)."""
    from flexattn_ops import triton_decode

    calls: list[int] = []
    real = triton_decode._launch_combine

    def counting(out_p, *args, **kwargs):
        calls.append(out_p.shape[0])
        return real(out_p, *args, **kwargs)

    monkeypatch.setattr(triton_decode, "_launch_combine", counting)
    return calls


def test_backend_is_triton():
    q = torch.randn(1, 1, 2, 8)
    assert dispatch.explain("fwd_kvcache", q, q, q, AttnArgs()).selected == "triton"
    assert dispatch.explain("combine", q, q, q, AttnArgs()).selected == "triton"


@pytest.mark.parametrize("page", [None, 5, 16])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("window", [(-1, -1), (70, 0), (40, 9)])
def test_long_cache_windows_and_splits(window, num_splits, page):
    """A 200-slot cache: many 16-key tiles, so the unmasked middle loop runs between masked edges, and
    splits whose runs fall outside the window come back empty (lse -inf) and weigh nothing."""
    g = torch.Generator().manual_seed(4)
    case = make_case(b=2, sq=3, s_new=3, cache_len=200, page=page, window_size=window, num_splits=num_splits, seed=6)
    case.kwargs["alibi_slopes"] = torch.rand(4, generator=g) * 0.05
    check(case)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_rotary_bf16_and_local_window(num_splits):
    case = make_case(sq=2, s_new=2, rotary_dim=12, dtype=torch.bfloat16, window_size=(4, 0), leftpad=True)
    check(case, num_splits=num_splits)


def test_rotary_fp16_neox_paged_page1():
    check(make_case(sq=1, s_new=1, rotary_dim=16, dtype=torch.float16, page=1, rotary_interleaved=False))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_query_rows_over_several_tiles(num_splits):
    """GQA group of 4 x 5 query rows = 20 rows > one 16-row tile: two row tiles per group, only the first
    of which writes the appended keys."""
    check(make_case(heads=(8, 2, 2), sq=5, s_new=5, cache_len=40, causal=True, rotary_dim=8, num_splits=num_splits))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_empty_sequences_give_zero_and_neg_inf(num_splits):
    case = make_case(s_new=0, sq=2, num_splits=num_splits)
    case.seqlens = [0, 5, 0]
    out, lse, _, _ = case.run()
    assert not out.isnan().any() and (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    check(case)


@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 4096])
@pytest.mark.parametrize("sinks", [False, True])
def test_num_splits(num_splits, sinks, combine_calls):
    """Every split count gives the oracle's answer; more than one split really goes through combine
    (4096 is capped at one split per key tile)."""
    from flexattn_ops import triton_decode

    case = make_case(cache_len=1100, s_new=3, sq=3, causal=True, num_splits=num_splits, page=16, seed=5)
    if sinks:
        case.kwargs["sinks"] = torch.randn(4)
    check(case)
    cache_len = case.block_table.shape[1] * 16
    heuristic = triton_decode.choose_num_splits(0, 3 * 2, cache_len, 16, torch.device("cpu"), paged=True)
    expected = {0: heuristic, 1: 1, 2: 2, 5: 5}
    expected[4096] = min(triton_decode.MAX_SPLITS, cache_len // 16)
    n = expected[num_splits]
    assert combine_calls == ([n] if n > 1 else [])


def test_split_heuristic_uses_shapes_and_sm_count(monkeypatch):
    """The numbers the heuristic gives on an H100 (132 SMs) for the benchmark's decode shapes, GQA 32/8."""
    from flexattn_ops import triton_decode

    monkeypatch.setattr(triton_decode, "sm_count", lambda device: 132)
    dev = torch.device("cuda")
    pick = [triton_decode.choose_num_splits(0, b * 8, kv, 64, dev) for b, kv in ((1, 32768), (16, 8192), (64, 4096))]
    assert pick == [33, 1, 1]  # the optima the H100 sweep measured (benchmarks/RESULTS_decode.md)
    paged = [
        triton_decode.choose_num_splits(0, b * 8, kv, 64, dev, paged=True)
        for b, kv in ((1, 32768), (16, 8192), (64, 4096), (128, 2048))
    ]
    assert paged == [66, 5, 2, 1]
    assert triton_decode.choose_num_splits(0, 128 * 8, 2048, 64, dev) == 1
    assert triton_decode.choose_num_splits(0, 8, 300, 64, dev) == 1  # short caches are not split
    assert triton_decode.choose_num_splits(7, 8, 300, 64, dev) == 5  # asked for: capped at one per tile


def test_decode_tiles_follow_waves(monkeypatch):
    """Compiled-GPU tiles for GQA 32/8 hd 128 on 132 SMs: the default up to one wave of 3 programs per SM,
    32-key tiles while all programs fit at 7 per SM, 128-key tiles beyond (RESULTS_decode.md); fp32 and
    wide heads keep their own tiles."""
    from flexattn_ops import triton_decode, triton_tuning

    monkeypatch.setattr(triton_tuning, "interpreting", lambda: False)
    tiles = [
        (c["BLOCK_M"], c["BLOCK_N"], c["num_stages"])
        for c in (
            triton_decode.decode_config(torch.bfloat16, 128, 128, 4, b * 8 / 132) for b in (1, 16, 48, 64, 112, 128)
        )
    ]
    assert tiles == [(16, 64, 3), (16, 64, 3), (16, 64, 3), (16, 32, 2), (16, 32, 2), (16, 128, 3)]
    assert triton_decode.decode_config(torch.bfloat16, 128, 128, 4)["BLOCK_N"] == 64  # paged: no wave count
    assert triton_decode.decode_config(torch.float32, 128, 128, 4, 7.8)["BLOCK_N"] == 32
    assert triton_decode.decode_config(torch.bfloat16, 256, 256, 4, 7.8)["BLOCK_N"] == 32


def test_wave_rule_asked_only_for_plain_contiguous_calls(monkeypatch):
    """On a GPU kind the wave rule was measured on, fwd_kvcache passes the unsplit grid's programs per SM
    (4 SMs off CUDA) to decode_config for contiguous caches with or without appended keys, and 0 (the
    default tiles) for paged caches, rotary (where the rule's tiles measured slower) and asked-for
    splits; other GPUs always get 0."""
    from flexattn_ops import triton_decode

    asked: list[float] = []
    real = triton_decode.decode_config

    def spy(*args):
        asked.append(args[4])
        return real(*args)

    monkeypatch.setattr(triton_decode, "decode_config", spy)
    plain = dict(b=3, heads=(4, 2, 2), s_new=0)  # 3 batches x 2 kv groups x 1 row tile on 4 SMs
    check(make_case(**plain))
    monkeypatch.setattr(triton_decode, "wave_tiles_measured", lambda device: True)
    check(make_case(**plain))
    check(make_case(b=3, heads=(4, 2, 2)))
    check(make_case(b=3, heads=(4, 2, 2), rotary_dim=8))
    check(make_case(b=3, heads=(4, 2, 2), page=16))
    check(make_case(**plain, num_splits=2))
    assert asked == [0.0, 1.5, 1.5, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# combine


@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
def test_combine_matches_logsumexp(layout):
    g = torch.Generator().manual_seed(0)
    out_p = torch.randn(4, 3, 5, 2, 7, generator=g)
    lse_p = torch.randn(4, 3, 5, 2, generator=g) * 3
    lse_p[1, 0] = float("-inf")  # one split without keys for some rows
    lse_p[:, 2, 1] = float("-inf")  # rows without any key
    out_p[1, 0] = float("nan")  # a dead split's output must not leak
    if layout == "permuted":
        out_p = out_p.transpose(2, 3).contiguous().transpose(2, 3)
        lse_p = lse_p.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        out_p, lse_p = out_p[:, :, 1:], lse_p[:, :, 1:]
    out, lse = torch.ops.flexattn.combine(out_p, lse_p)
    ref_out, ref_lse = _combine_oracle(out_p, lse_p)
    assert out.dtype == lse.dtype == torch.float32 and out.is_contiguous() and lse.is_contiguous()
    assert not out.isnan().any() and not lse.isnan().any()
    assert_rel_close("out", out, ref_out)
    assert_rel_close("lse", lse, ref_lse)


def test_combine_of_key_chunks_is_full_attention():
    """What ring attention relies on: fwd over disjoint key chunks, merged, equals fwd over all keys."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 5, 4, 16, generator=g)
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


# ---------------------------------------------------------------------------------------------
# opcheck and no host synchronisation


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
def test_opcheck_fwd_kvcache(layout, paged):
    torch.library.opcheck(torch.ops.flexattn.fwd_kvcache.default, _kvcache_op_args(layout, paged))


@pytest.mark.parametrize("seed", range(40))
def test_random_feature_combinations(seed):
    """Every feature at once in random combinations (rotary x leftpad x pages x splits x masks x heads x
    dtypes), for the interactions the one-feature tests above do not reach."""
    g = torch.Generator().manual_seed(2000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    hq, hk, hv = pick([(4, 2, 1), (6, 3, 2), (2, 2, 2), (8, 1, 4), (8, 2, 2)])
    dqk, dv = pick([(16, 16), (24, 8), (8, 40), (32, 32)])
    s_new = pick([0, 1, 4])
    page = pick([None, 1, 3, 16, 32])
    kwargs = {"causal": pick([False, True]), "num_splits": pick([0, 1, 2, 7])}
    if pick([False, True]):
        kwargs["window_size"] = (pick([-1, 0, 3, 20]), pick([-1, 0, 2]))
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
        cache_len=pick([9, 40, 70]),
        leftpad=pick([False, True]),
        batch_idx=page is None and pick([False, True]),
        rotary_dim=pick([None, 8]) if s_new else None,
        dtype=pick([torch.float32, torch.bfloat16, torch.float16]),
        rotary_interleaved=pick([False, True]),
        seed=seed,
        **kwargs,
    )
    check(case)


@pytest.mark.parametrize(
    "cfg,page",
    [((16, 64), None), ((16, 64), 64), ((16, 64), 256), ((16, 32), 3), ((64, 128), 16), ((32, 64), None)],
    ids=lambda x: str(x),
)
def test_gpu_tile_configs(cfg, page, monkeypatch):
    """The tile sizes the GPU runs (BLOCK_N 32..128, BLOCK_M 16..64; the interpreter default is 16 x 16),
    with pages equal to, larger than and smaller than a tile, windows and splits."""
    from flexattn_ops import triton_decode

    block_m, block_n = cfg
    monkeypatch.setattr(
        triton_decode,
        "decode_config",
        lambda *a: {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 2},
    )
    for splits, window in ((1, (-1, -1)), (3, (150, 0))):
        case = make_case(
            b=2, sq=3, s_new=3, heads=(8, 2, 2), cache_len=512, page=page, window_size=window, num_splits=splits, seed=8
        )
        check(case)
