"""Triton kernels for `flexattn::fwd_kvcache` (decode / append against a KV cache) and `flexattn::combine`.

Layout of the work. One program owns a tile of query rows of ONE batch row: the ``G`` query heads that
share a k head and a v head (``G = gcd(hq // hk, hq // hv)``, the whole GQA group when hk == hv) times
the ``sq`` query positions, flattened as ``row = head_in_group * sq + i`` and padded to BLOCK_M >= 16
(tl.dot's minimum). So each K/V tile is read once per group, not once per query head: for GQA 32/8 that
is 4x fewer bytes than a per-head kernel, and decode is bound by exactly those bytes.

Split-KV. The cache slots a tile needs (valid ``[leftpad, cache_seqlens)`` cut to the window) are cut into
BLOCK_N-aligned key tiles, and the tiles into ``num_splits`` contiguous runs, one run per program; each
program writes a partial (out, lse) in float32 and `combine_kernel` merges them (folding sinks in once).
With one split the attention kernel writes the final output directly. The number of splits is chosen on
the host from shapes and the SM count alone (`choose_num_splits`): no value is read from the device.

Append. The new keys/values (slots ``[cache_seqlens, cache_seqlens + s_new)``) are never read back from
the cache: the last split of every tile loads them from ``k``/``v``, applies rotary to k in registers,
attends to them and (one program per k head and per v head) stores them into the cache. Old slots are
only read and new slots only written, so programs never wait on each other's writes.

Rotary (interleaved or GPT-NeoX, rotary_dim <= headdim) is applied to q and the new k inside the kernel,
in float32, then rounded to the input dtype (the value stored in the cache is the value attended to),
at positions ``cache_seqlens - leftpad + i`` (q: ``+ i`` only with a causal/local mask, as flash-attn).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from flexattn_ops import triton_launch
from flexattn_ops import triton_tuning as tuning
from flexattn_ops.params import AttnArgs, KVCacheArgs
from flexattn_ops.triton_common import (
    LN2,
    LOG2E,
    dim_mask,
    keep_mask,
    mm,
    page_lookup,
    page_offsets,
    score_mods,
    to_operand,
)

MAX_HEADDIM = 256
MAX_SPLITS = 128  # partials are (splits, b, sq, hq, dv) float32; 128 splits of 1 row x 32 heads x 128 = 2 MB
# A split should stream at least this many keys: below ~256 keys (64 KB of K+V at hd 128 bf16) the fixed
# cost of a program (q load, rotary, partial write, its share of combine) is no longer small.
MIN_KEYS_PER_SPLIT = 256
# Programs per SM the heuristic aims for when it splits. Measured on the H100 (benchmarks/RESULTS_decode.md,
# GQA 32/8, hd 128): b=1 kv 32k peaks at 33 splits (2 per SM, 2448 GB/s) against 2322 at 66 and 1923 at 128.
PROGRAMS_PER_SM = 2
# Contiguous caches: splitting stops paying once the unsplit grid covers this fraction of the SMs: b=16 kv 8k
# (128 programs) ran 3072 GB/s unsplit against 2994 at 2 splits; b=64 and b=128 likewise peaked unsplit.
NO_SPLIT_FILL = 0.5
# Paged caches add a dependent page-table load to every key tile, and more programs in flight hide it: at
# 4 per SM, always splitting, paged-256 ran 2845 / 2936 GB/s at b=16 kv 8k / b=64 kv 4k against 2442 / 2753
# with the contiguous rule (1 split); b=1 kv 32k: 66 splits 2254, 33 splits 2376 (one sweep, one table).
PAGED_PROGRAMS_PER_SM = 4
# Resident programs per SM on sm_90 at hd 128 bf16 (4 warps; registers and shared memory from an offline
# sm_90a compile): the default 64-key / 3-stage tiles use 162 registers and 70 KB, so 3 fit an SM; 32-key /
# 2-stage tiles 72 registers and 21 KB, so 7 fit. An unsplit contiguous grid of more than 3 programs per SM
# runs the default tiles in waves, the last one partial: up to 7 per SM, 32-key tiles keep every program
# resident; beyond, 128-key / 3-stage tiles (230 registers, 136 KB: 1 per SM) make each program one long
# stream. Measured on the H100 in interleaved rounds against cuDNN (benchmarks/RESULTS_decode.md): b=64 kv 4k
# (3.9 per SM) 1.012x with 32-key tiles against 0.966x with the default; b=128 kv 2k (7.8 per SM) 1.002x
# with 128-key tiles against 0.986x. Other GPUs keep the default: fewer registers or less shared memory
# per SM move both limits, and the 128-key tiles do not fit sm_86/89's 99 KB per block at all.
DEFAULT_TILE_WAVE = 3
SMALL_TILE_WAVE = 7


# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _slot_offsets(
    Bt_row,
    cache_row,
    n0,
    offs_n,
    mask_n,
    page_size,
    stride_cb,
    stride_cs,
    PAGED: tl.constexpr,
    PAGE_TILES: tl.constexpr,
):
    """int64 offsets (BLOCK_N,) of cache slots ``offs_n`` of one sequence (head offset not included).

    Contiguous: row ``cache_row``. Paged: page ``block_table[slot // page_size]`` (triton_common.page_lookup);
    with PAGE_TILES (the page size a multiple of BLOCK_N, tiles BLOCK_N-aligned) the whole tile lies in one
    page: one lookup.
    """
    if PAGED:
        page, slot = page_lookup(Bt_row, n0, offs_n, mask_n, page_size, PAGE_TILES)
        return page_offsets(page, slot, stride_cb, stride_cs)
    else:
        return cache_row.to(tl.int64) * stride_cb + offs_n.to(tl.int64) * stride_cs


@triton.jit
def _load_rows(ptrs, offs_d, row_mask, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr = True):
    """Load a (rows, BLOCK_D) tile at ``ptrs`` (rows, 1) + offs_d; zero outside the rows / head dim.
    Without MASK_ROWS every row is known valid (the unmasked key tiles): no predicate when D is a power of 2."""
    if D == BLOCK_D:
        if MASK_ROWS:
            return tl.load(ptrs + offs_d[None, :], mask=row_mask, other=0.0)
        else:
            return tl.load(ptrs + offs_d[None, :])
    else:
        if MASK_ROWS:
            return tl.load(ptrs + offs_d[None, :], mask=row_mask & (offs_d[None, :] < D), other=0.0)
        else:
            return tl.load(ptrs + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _rotate(x, ptrs, offs_d, row_mask, pos, Cos, Sin, stride_ro, stride_rd, rot_half, INTERLEAVED: tl.constexpr):
    """Rotary on a loaded tile x (rows, BLOCK_D) in float32: the first 2 * rot_half dims turn by the angles
    at row positions ``pos`` (rows,). Interleaved pairs (2m, 2m+1); GPT-NeoX pairs (m, m + rot_half). The
    partner element comes from a second load of the same rows (L1 hits: the row was just read)."""
    d = offs_d[None, :]
    rot = d < 2 * rot_half
    if INTERLEAVED:
        partner = d ^ 1
        col = d // 2
        sign = tl.where((d % 2) == 0, -1.0, 1.0)
    else:
        first = d < rot_half
        partner = tl.where(first, d + rot_half, d - rot_half)
        col = tl.where(first, d, d - rot_half)
        sign = tl.where(first, -1.0, 1.0)
    m = row_mask & rot
    xp = tl.load(ptrs + partner, mask=m, other=0.0).to(tl.float32)
    cs_off = pos[:, None].to(tl.int64) * stride_ro + col * stride_rd
    c = tl.load(Cos + cs_off, mask=m, other=1.0).to(tl.float32)
    s = tl.load(Sin + cs_off, mask=m, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    return tl.where(rot, xf * c + sign * xp * s, xf)


@triton.jit
def _attend(
    acc,
    m_i,
    l_i,
    q,
    k,
    v,
    qa,
    p,
    valid,
    slope,
    sm_scale,
    softcap,
    window_left,
    window_right,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key tile of the online softmax (base 2). qa (BM, 1): query positions aligned to the keys;
    p (1, BN): key positions; valid (1, BN): the key exists (only read when MASKED)."""
    qk = mm(q, tl.trans(k), PRECISION)
    if HAS_SOFTCAP or HAS_ALIBI:
        s, _t = score_mods(qk, qa, p, sm_scale, softcap, slope, 0.0, 0, HAS_SOFTCAP, HAS_ALIBI, False)
        s = s * LOG2E
    else:
        s = qk * (sm_scale * LOG2E)
    if MASKED:
        # keep_mask's "j < sk" bound is carried by `valid`; only its window part is needed here
        keep = valid & keep_mask(qa, p, p + 1, 0, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked: no inf - inf
    pr = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + mm(to_operand(pr, v, PRECISION), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _cache_tiles(
    acc,
    m_i,
    l_i,
    q,
    K_head,
    V_head,
    Bt_row,
    cache_row,
    t_lo,
    t_hi,
    leftpad,
    seqlen_old,
    qa,
    slope,
    sm_scale,
    softcap,
    window_left,
    window_right,
    page_size,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_TILES: tl.constexpr,
    SAME_SLOTS: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Key tiles [t_lo, t_hi) (units of BLOCK_N slots) of the old cache contents, read from the cache."""
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for t in range(t_lo, t_hi):
        n0 = t * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            valid_n = (offs_n >= leftpad) & (offs_n < seqlen_old)
        else:
            valid_n = offs_n >= 0  # all true (the unmasked middle holds only valid slots)
        k_off = _slot_offsets(
            Bt_row, cache_row, n0, offs_n, valid_n, page_size, stride_kb, stride_ks, PAGED, PAGE_TILES
        )
        k = _load_rows(K_head + k_off[:, None], offs_dk, valid_n[:, None], DQK, BLOCK_DQK, MASKED)
        if SAME_SLOTS:
            v_off = k_off  # same slot layout (the usual case): skip recomputing the page lookups
        else:
            v_off = _slot_offsets(
                Bt_row, cache_row, n0, offs_n, valid_n, page_size, stride_vb, stride_vs, PAGED, PAGE_TILES
            )
        v = _load_rows(V_head + v_off[:, None], offs_dv, valid_n[:, None], DV, BLOCK_DV, MASKED)
        p = (offs_n - leftpad)[None, :]
        acc, m_i, l_i = _attend(
            acc,
            m_i,
            l_i,
            q,
            k,
            v,
            qa,
            p,
            valid_n[None, :],
            slope,
            sm_scale,
            softcap,
            window_left,
            window_right,
            MASKED,
            HAS_LEFT,
            HAS_RIGHT,
            HAS_SOFTCAP,
            HAS_ALIBI,
            PRECISION,
        )
    return acc, m_i, l_i


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit(
    do_not_specialize=["sq", "s_new", "n_splits", "cache_len", "window_left", "window_right", "rot_half", "ro_len"]
)
def kvcache_fwd_kernel(
    Q,
    K,
    V,
    Knew,
    Vnew,
    Out,
    Lse,
    Cos,
    Sin,
    Seqlens,
    BatchIdx,
    Leftpad,
    BlockTable,
    Alibi,
    Sinks,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_knb,
    stride_kns,
    stride_knh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_osp,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lsp,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_ro,
    stride_rd,
    stride_btb,
    stride_ab,
    stride_ah,
    hq,
    q_per_k,
    q_per_v,
    sq,
    s_new,
    cache_len,
    page_size,
    n_splits,
    rot_half,
    ro_len,
    sm_scale,
    softcap,
    window_left,
    window_right,
    G: tl.constexpr,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_TILES: tl.constexpr,
    SAME_SLOTS: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr,
    HAS_NEW: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROTARY_LOCAL: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    FOLD_SINKS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (m_tiles * n_splits, b * hq // G).

    Q (b, sq, hq, dqk); caches (b_cache | num_pages, seqlen | page_size, hk | hv, d); Knew/Vnew
    (b, s_new, hk | hv, d). Out/Lse: the final (b, sq, hq, dv) / (b, hq, sq) when n_splits == 1 (stride_osp
    = stride_lsp = 0), else float32 partials indexed by split first. FOLD_SINKS adds the sink logit here
    (one split only; with several, `combine_kernel` adds it once).
    """
    pid_ms = tl.program_id(0)
    pid_bg = tl.program_id(1)
    split = pid_ms % n_splits
    m_tile = pid_ms // n_splits
    n_groups = hq // G
    b = pid_bg // n_groups
    h0 = (pid_bg % n_groups) * G
    kh = h0 // q_per_k
    vh = h0 // q_per_v

    # -- per-sequence lengths: valid slots [leftpad, seqlen_old + s_new); positions count from leftpad
    seqlen_old = cache_len
    if HAS_SEQLENS:
        seqlen_old = tl.load(Seqlens + b)
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = tl.load(Leftpad + b)
    cache_row = b
    if HAS_BATCH_IDX:
        cache_row = tl.load(BatchIdx + b)
    n_new = 0
    if HAS_NEW:
        n_new = s_new
    off = seqlen_old + n_new - leftpad - sq  # bottom-right alignment: query i sits at key position i + off

    # -- query rows of this tile: row = head_in_group * sq + i
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * sq
    hh = rows // sq
    qi = rows % sq
    head = h0 + hh
    qa = (qi + off)[:, None]
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + qi[:, None].to(tl.int64) * stride_qs + head[:, None] * stride_qh
    q = _load_rows(q_ptrs, offs_dk, row_ok[:, None], DQK, BLOCK_DQK)
    if HAS_ROTARY:
        start = seqlen_old - leftpad
        q_pos = start + qi
        if not ROTARY_LOCAL:
            q_pos = start + qi * 0  # flash-attn: without a causal/local mask every query sits at `start`
        q_pos = tl.minimum(tl.maximum(q_pos, 0), ro_len - 1)
        q = _rotate(q, q_ptrs, offs_dk, row_ok[:, None], q_pos, Cos, Sin, stride_ro, stride_rd, rot_half, INTERLEAVED)
        q = q.to(Q.dtype.element_ty)  # the reference rounds rotated q to its dtype too
    slope = tl.zeros([BLOCK_M, 1], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + head * stride_ah, mask=row_ok, other=0.0).to(tl.float32)[:, None]

    # -- the old slots this tile needs, in slot units: [lo, hi) any row sees, [full_lo, full_hi) every row
    i_min = tl.min(tl.where(row_ok, qi, sq), 0)
    i_max = tl.max(tl.where(row_ok, qi, 0), 0)
    lo = leftpad
    full_lo = leftpad
    hi = seqlen_old
    full_hi = seqlen_old
    if HAS_LEFT:
        lo = tl.maximum(lo, i_min + off - window_left + leftpad)
        full_lo = tl.maximum(full_lo, i_max + off - window_left + leftpad)
    if HAS_RIGHT:
        hi = tl.minimum(hi, i_max + off + window_right + leftpad + 1)
        full_hi = tl.minimum(full_hi, i_min + off + window_right + leftpad + 1)
    t0 = lo // BLOCK_N  # lo >= leftpad >= 0: floor division is exact here
    t1 = tl.where(hi > lo, (hi + BLOCK_N - 1) // BLOCK_N, t0)
    per_split = (t1 - t0 + n_splits - 1) // n_splits
    ts = tl.minimum(t0 + split * per_split, t1)
    te = tl.minimum(ts + per_split, t1)
    # fully unmasked tiles [f0, f1), clipped to this split's run
    f0 = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N, ts), te)
    f1 = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK_N, f0), te)

    K_head = K + kh.to(tl.int64) * stride_kh
    V_head = V + vh.to(tl.int64) * stride_vh
    Bt_row = BlockTable + b.to(tl.int64) * stride_btb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, m_i, l_i = _cache_tiles(
        acc,
        m_i,
        l_i,
        q,
        K_head,
        V_head,
        Bt_row,
        cache_row,
        ts,
        f0,
        leftpad,
        seqlen_old,
        qa,
        slope,
        sm_scale,
        softcap,
        window_left,
        window_right,
        page_size,
        stride_kb,
        stride_ks,
        stride_vb,
        stride_vs,
        DQK,
        DV,
        BLOCK_N,
        BLOCK_DQK,
        BLOCK_DV,
        True,
        PAGED,
        PAGE_TILES,
        SAME_SLOTS,
        HAS_LEFT,
        HAS_RIGHT,
        HAS_SOFTCAP,
        HAS_ALIBI,
        PRECISION,
    )
    acc, m_i, l_i = _cache_tiles(
        acc,
        m_i,
        l_i,
        q,
        K_head,
        V_head,
        Bt_row,
        cache_row,
        f0,
        f1,
        leftpad,
        seqlen_old,
        qa,
        slope,
        sm_scale,
        softcap,
        window_left,
        window_right,
        page_size,
        stride_kb,
        stride_ks,
        stride_vb,
        stride_vs,
        DQK,
        DV,
        BLOCK_N,
        BLOCK_DQK,
        BLOCK_DV,
        False,
        PAGED,
        PAGE_TILES,
        SAME_SLOTS,
        HAS_LEFT,
        HAS_RIGHT,
        HAS_SOFTCAP,
        HAS_ALIBI,
        PRECISION,
    )
    acc, m_i, l_i = _cache_tiles(
        acc,
        m_i,
        l_i,
        q,
        K_head,
        V_head,
        Bt_row,
        cache_row,
        f1,
        te,
        leftpad,
        seqlen_old,
        qa,
        slope,
        sm_scale,
        softcap,
        window_left,
        window_right,
        page_size,
        stride_kb,
        stride_ks,
        stride_vb,
        stride_vs,
        DQK,
        DV,
        BLOCK_N,
        BLOCK_DQK,
        BLOCK_DV,
        True,
        PAGED,
        PAGE_TILES,
        SAME_SLOTS,
        HAS_LEFT,
        HAS_RIGHT,
        HAS_SOFTCAP,
        HAS_ALIBI,
        PRECISION,
    )

    # -- the new keys: the last split of each tile attends to them from k/v; the first row tile of the
    # first query-head tile of each k (v) head also writes them to the cache (identical values, so
    # the other programs need not; nobody reads these slots from the cache in this call)
    if HAS_NEW:
        if split == n_splits - 1:
            # as row limits (s_new or 0): the interpreter rejects a scalar bool broadcast into a store mask
            k_lim = s_new * ((m_tile == 0) & (h0 % q_per_k == 0)).to(tl.int32)
            v_lim = s_new * ((m_tile == 0) & (h0 % q_per_v == 0)).to(tl.int32)
            for n0 in range(0, s_new, BLOCK_N):
                offs_t = n0 + tl.arange(0, BLOCK_N)
                t_ok = offs_t < s_new
                kn_ptrs = (
                    Knew + b.to(tl.int64) * stride_knb + offs_t[:, None].to(tl.int64) * stride_kns + kh * stride_knh
                )
                k = _load_rows(kn_ptrs, offs_dk, t_ok[:, None], DQK, BLOCK_DQK)
                if HAS_ROTARY:
                    k_pos = tl.minimum(tl.maximum(seqlen_old - leftpad + offs_t, 0), ro_len - 1)
                    k = _rotate(
                        k, kn_ptrs, offs_dk, t_ok[:, None], k_pos, Cos, Sin, stride_ro, stride_rd, rot_half, INTERLEAVED
                    ).to(K.dtype.element_ty)
                vn_ptrs = (
                    Vnew + b.to(tl.int64) * stride_vnb + offs_t[:, None].to(tl.int64) * stride_vns + vh * stride_vnh
                )
                v = _load_rows(vn_ptrs, offs_dv, t_ok[:, None], DV, BLOCK_DV)
                slots = seqlen_old + offs_t
                k_off = _slot_offsets(Bt_row, cache_row, 0, slots, t_ok, page_size, stride_kb, stride_ks, PAGED, False)
                v_off = _slot_offsets(Bt_row, cache_row, 0, slots, t_ok, page_size, stride_vb, stride_vs, PAGED, False)
                tl.store(
                    K_head + k_off[:, None] + offs_dk[None, :],
                    k.to(K.dtype.element_ty),
                    mask=(offs_t[:, None] < k_lim) & (offs_dk[None, :] < DQK),
                )
                tl.store(
                    V_head + v_off[:, None] + offs_dv[None, :],
                    v.to(V.dtype.element_ty),
                    mask=(offs_t[:, None] < v_lim) & (offs_dv[None, :] < DV),
                )
                p = (slots - leftpad)[None, :]
                acc, m_i, l_i = _attend(
                    acc,
                    m_i,
                    l_i,
                    q,
                    k,
                    v,
                    qa,
                    p,
                    (t_ok & (slots >= leftpad))[None, :],  # as the reference: slots before leftpad never count
                    slope,
                    sm_scale,
                    softcap,
                    window_left,
                    window_right,
                    True,
                    HAS_LEFT,
                    HAS_RIGHT,
                    HAS_SOFTCAP,
                    HAS_ALIBI,
                    PRECISION,
                )

    if FOLD_SINKS:
        # the sink is one more logit in the denominator (and in lse), with no value row
        sink = tl.load(Sinks + head, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        m_f = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_f)
        l_i = l_i * alpha + tl.math.exp2(sink - m_f)
        acc = acc * alpha[:, None]
        m_i = m_f
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = (
        Out
        + split.to(tl.int64) * stride_osp
        + b.to(tl.int64) * stride_ob
        + qi[:, None].to(tl.int64) * stride_os
        + head[:, None] * stride_oh
        + offs_dv[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_mask(offs_dv, DV, BLOCK_DV))
    l_ptrs = Lse + split.to(tl.int64) * stride_lsp + b.to(tl.int64) * stride_lb + head * stride_lh + qi * stride_ls
    tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_splits", "n1", "n2"])
def combine_kernel(
    OutP,
    LseP,
    Out,
    Lse,
    Sinks,
    n_splits,
    n1,
    n2,  # fmt: skip
    stride_ps,
    stride_p0,
    stride_p1,
    stride_p2,
    stride_qs,
    stride_q0,
    stride_q1,
    stride_q2,
    stride_o0,
    stride_o1,
    stride_o2,
    stride_l0,
    stride_l1,
    stride_l2,
    DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """Grid (rows,): one row r = (r0, r1, r2), r1 < n1, r2 < n2 (r1 is the head when HAS_SINKS) per program.

    OutP (splits, rows, dv) and LseP (splits, rows) partials -> Out (rows, dv), Lse (rows,) natural log.
    Two passes over the splits, BLOCK_S at a time: the max of the lse, then the weighted sum, so every
    load of a pass is independent (a serial online merge would wait on each split's load in turn: 66
    splits x ~1 us of L2 latency is as long as the whole b=1, 32k decode). A split with lse -inf weighs 0
    whatever its out holds (NaN included); a row without keys gets out 0, lse -inf (or the sink's).
    """
    row = tl.program_id(0)
    r2 = (row % n2).to(tl.int64)
    r1 = ((row // n2) % n1).to(tl.int64)
    r0 = (row // (n1 * n2)).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = dim_mask(offs_d, DV, BLOCK_DV)  # constant-true when DV is a power of 2: vector loads
    p_row = OutP + r0 * stride_p0 + r1 * stride_p1 + r2 * stride_p2
    q_row = LseP + r0 * stride_q0 + r1 * stride_q1 + r2 * stride_q2
    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    for s0 in range(0, n_splits, BLOCK_S):
        s_idx = s0 + offs_s
        lse_s = tl.load(q_row + s_idx.to(tl.int64) * stride_qs, mask=s_idx < n_splits, other=float("-inf"))
        m = tl.maximum(m, tl.max(lse_s.to(tl.float32), 0))
    if HAS_SINKS:
        sink = tl.load(Sinks + r1).to(tl.float32)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s_idx = s0 + offs_s
        lse_s = tl.load(q_row + s_idx.to(tl.int64) * stride_qs, mask=s_idx < n_splits, other=float("-inf"))
        w = tl.exp(lse_s.to(tl.float32) - m_safe)
        live = (w > 0.0)[:, None]
        o = tl.load(p_row + s_idx[:, None].to(tl.int64) * stride_ps + offs_d[None, :], mask=live & d_ok, other=0.0).to(
            tl.float32
        )
        acc += tl.sum(tl.where(live, w[:, None] * o, 0.0), 0)
        den += tl.sum(w, 0)
    if HAS_SINKS:
        den += tl.exp(sink - m_safe)
    den_safe = tl.where(den > 0.0, den, 1.0)
    out = acc / den_safe
    lse = tl.where(den > 0.0, m_safe + tl.log(den_safe), float("-inf"))
    o_row = Out + r0 * stride_o0 + r1 * stride_o1 + r2 * stride_o2
    tl.store(o_row + offs_d[None, :], out.to(Out.dtype.element_ty)[None, :], mask=d_ok)
    tl.store(Lse + r0 * stride_l0 + r1 * stride_l1 + r2 * stride_l2, lse)


# ---------------------------------------------------------------------------------------------
# Host side


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def _cuda_properties(device: torch.device):
    """`device`'s properties (cached per device: querying the driver costs microseconds a call)."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    """Multiprocessors of `device` (no synchronisation); 4 off CUDA (the interpreter)."""
    return _cuda_properties(device).multi_processor_count if device.type == "cuda" else 4


def wave_tiles_measured(device: torch.device) -> bool:
    """Whether the wave rule's tiles (DEFAULT_TILE_WAVE) were measured on this GPU's kind: sm_90 only."""
    if device.type != "cuda":
        return False
    props = _cuda_properties(device)
    return (props.major, props.minor) == (9, 0)


def decode_block_m(rows: int) -> int:
    """BLOCK_M for `rows` packed query rows: 16 (tl.dot's minimum) up to 64."""
    return min(64, max(16, tuning.next_power_of_2(rows)))


def decode_config(dtype: torch.dtype, dqk: int, dv: int, rows: int, programs_per_sm: float = 0.0) -> tuning.Config:
    """Tile configuration of `kvcache_fwd_kernel` for `rows` = G * sq query rows per (batch, kv group);
    `programs_per_sm` is the unsplit grid over the SM count for a contiguous cache (0: paged, rotary, or
    unknown).

    Decode is bound by reading K/V: BLOCK_M just covers the packed rows (16 = tl.dot's minimum holds a
    GQA group of up to 16 heads at sq = 1); BLOCK_N = 64 keys gives 16 KB K and 16 KB V tiles at hd 128
    bf16, and 3 pipeline stages keep ~64 KB of loads in flight per program. Grids larger than one wave
    of those take other tiles (DEFAULT_TILE_WAVE, SMALL_TILE_WAVE).
    """
    if tuning.interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    block_m = decode_block_m(rows)
    width = tuning.pad_dim(dqk) + tuning.pad_dim(dv)
    block_n = 64 if width <= 256 else 32
    if dtype == torch.float32:
        block_n = min(block_n, 32)
    stages = 3 if width <= 256 else 2
    if width <= 256 and dtype != torch.float32 and programs_per_sm > DEFAULT_TILE_WAVE:
        block_n, stages = (32, 2) if programs_per_sm <= SMALL_TILE_WAVE else (128, 3)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": stages}


def choose_num_splits(
    num_splits: int, base_programs: int, cache_len: int, block_n: int, device: torch.device, paged: bool = False
) -> int:
    """How many key splits each tile of query rows gets. `num_splits` > 0 is honoured up to MAX_SPLITS and
    one split per key tile; 0 picks from the shapes and the SM count only (never from cache_seqlens, which
    lives on the device). Contiguous caches: none once the unsplit grid fills NO_SPLIT_FILL of the SMs, else
    PROGRAMS_PER_SM per SM; paged caches: PAGED_PROGRAMS_PER_SM per SM; each split streams at least
    MIN_KEYS_PER_SPLIT of the cache capacity. H100 (132 SMs), GQA 32/8, b=1 / 16 / 64 / 128 at kv 32k / 8k /
    4k / 2k: contiguous 33 / 1 / 1 / 1 splits, paged 66 / 5 / 2 / 1."""
    tiles = max(1, tuning.cdiv(cache_len, block_n))
    if num_splits > 0:
        return max(1, min(num_splits, MAX_SPLITS, tiles))
    if paged:
        want = tuning.cdiv(PAGED_PROGRAMS_PER_SM * sm_count(device), max(1, base_programs))
    elif base_programs >= NO_SPLIT_FILL * sm_count(device):
        return 1
    else:
        want = tuning.cdiv(PROGRAMS_PER_SM * sm_count(device), max(1, base_programs))
    by_len = max(1, cache_len // MIN_KEYS_PER_SPLIT)
    return max(1, min(want, by_len, MAX_SPLITS, tiles))


def unsupported(op: str, q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> Optional[str]:
    """None if the Triton decode kernels run `op` ("fwd_kvcache": q, k_cache, v_cache; "combine":
    out_partial, lse_partial, lse_partial) on these inputs, else why not."""
    if op == "combine":
        return None
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton backend runs float16, bfloat16 and float32, got {q.dtype}"
    if q.shape[-1] > MAX_HEADDIM or v.shape[-1] > MAX_HEADDIM:
        return f"head dims up to {MAX_HEADDIM} on the Triton backend, got dqk={q.shape[-1]}, dv={v.shape[-1]}"
    return None


def fwd_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, c: KVCacheArgs, config: Optional[tuning.Config] = None
) -> tuple[Tensor, Tensor]:
    """The `flexattn::fwd_kvcache` op: q (b, sq, hq, dqk), caches (b_cache | pages, seqlen | page, hk | hv,
    d) appended in place -> out (b, sq, hq, dv) in q's dtype, lse (b, hq, sq) float32. `config` overrides
    the tile configuration and may carry "num_splits" (benchmarks and tuning only)."""
    b, sq, hq, dqk = q.shape
    hk, hv, dv = k_cache.shape[2], v_cache.shape[2], v_cache.shape[3]
    paged = c.block_table is not None
    page_size = k_cache.shape[1]
    cache_len = c.block_table.shape[1] * page_size if c.block_table is not None else k_cache.shape[1]
    s_new = c.k.shape[1] if c.k is not None else 0
    group = math.gcd(hq // hk, hq // hv)
    rows = group * sq
    n_groups = hq // group
    has_rotary = c.rotary_cos is not None and c.rotary_sin is not None and c.k is not None
    if config is not None:
        cfg = dict(config)
    else:
        # The wave rule was measured on plain and appending calls without asked-for splits; with rotary,
        # 128-key tiles halved the speed at b=128 (1430 against 2643 GB/s) and 32-key tiles cost 9% at b=64.
        per_sm = 0.0
        if not (paged or has_rotary or c.num_splits > 1) and wave_tiles_measured(q.device):
            per_sm = b * n_groups * tuning.cdiv(rows, decode_block_m(rows)) / sm_count(q.device)
        cfg = decode_config(q.dtype, dqk, dv, rows, per_sm)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    m_tiles = max(1, tuning.cdiv(rows, block_m))
    splits = cfg.get("num_splits") or choose_num_splits(
        c.num_splits, b * n_groups * m_tiles, cache_len, block_n, q.device, paged=paged
    )
    precision = tuning.dot_precision(q.dtype)
    # "upcast" kernels write float32 and the host rounds (to nearest, unlike the interpreter's conversion)
    out_dtype = torch.float32 if precision == "upcast" else q.dtype
    out = q.new_empty((b, sq, hq, dv), dtype=out_dtype)
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    if b * hq == 0:
        return out.to(q.dtype), lse
    if splits > 1:
        out_p = q.new_empty((splits, b, sq, hq, dv), dtype=torch.float32)
        lse_p = q.new_empty((splits, b, hq, sq), dtype=torch.float32)
    else:
        out_p, lse_p = out, lse
    dummy = q  # the pointer of every absent optional tensor: never read (its flag is off), nothing allocated
    knew = c.k if c.k is not None else k_cache
    vnew = c.v if c.v is not None else v_cache
    cos = c.rotary_cos if has_rotary else q
    sin = c.rotary_sin if has_rotary else q
    bt = c.block_table if c.block_table is not None else dummy
    alibi = c.alibi_slopes
    sinks = c.sinks.contiguous() if c.sinks is not None else None  # the kernels index sinks[head]
    page_tiles = tuning.page_tile_aligned(page_size if paged else 0, block_n)
    grid = (m_tiles * splits, b * n_groups)
    opts = {} if tuning.interpreting() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    osp = out_p.stride(0) if splits > 1 else 0
    lsp = lse_p.stride(0) if splits > 1 else 0
    o_str = out_p.stride()[-4:-1] if splits > 1 else out_p.stride()[:3]
    l_str = lse_p.stride()[-3:] if splits > 1 else lse_p.stride()
    triton_launch.launch(
        kvcache_fwd_kernel,
        grid,
        q,
        k_cache,
        v_cache,
        knew,
        vnew,
        out_p,
        lse_p,
        cos,
        sin,
        c.cache_seqlens if c.cache_seqlens is not None else dummy,
        c.cache_batch_idx if c.cache_batch_idx is not None else dummy,
        c.cache_leftpad if c.cache_leftpad is not None else dummy,
        bt,
        alibi if alibi is not None else q,
        sinks if sinks is not None else q,
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *knew.stride()[:3],
        *vnew.stride()[:3],
        osp,
        *o_str,
        lsp,
        *l_str,
        cos.stride(0) if has_rotary else 0,
        cos.stride(1) if has_rotary else 0,
        bt.stride(0) if paged else 0,
        (alibi.stride(0) if alibi.dim() == 2 else 0) if alibi is not None else 0,
        alibi.stride(-1) if alibi is not None else 0,
        hq,
        hq // hk,
        hq // hv,
        sq,
        s_new,
        cache_len,
        page_size,
        splits,
        cos.shape[1] if has_rotary else 0,
        cos.shape[0] if has_rotary else 1,
        float(c.softmax_scale),
        float(c.softcap) if c.softcap > 0 else 1.0,
        max(int(c.window_left), 0),
        max(int(c.window_right), 0),
        G=group,
        DQK=dqk,
        DV=dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DQK=tuning.pad_dim(dqk),
        BLOCK_DV=tuning.pad_dim(dv),
        PAGED=paged,
        PAGE_TILES=page_tiles,
        SAME_SLOTS=k_cache.stride()[:2] == v_cache.stride()[:2],
        HAS_SEQLENS=c.cache_seqlens is not None,
        HAS_BATCH_IDX=c.cache_batch_idx is not None and not paged,
        HAS_LEFTPAD=c.cache_leftpad is not None,
        HAS_NEW=c.k is not None and c.v is not None,
        HAS_ROTARY=has_rotary,
        INTERLEAVED=bool(c.rotary_interleaved),
        ROTARY_LOCAL=c.window_left >= 0 or c.window_right >= 0,
        HAS_LEFT=c.window_left >= 0,
        HAS_RIGHT=c.window_right >= 0,
        HAS_SOFTCAP=c.softcap > 0,
        HAS_ALIBI=alibi is not None,
        FOLD_SINKS=c.sinks is not None and splits == 1,
        PRECISION=precision,
        **opts,
    )
    if splits > 1:
        # rows (b, hq, sq): r0 = batch, r1 = head (for the sinks), r2 = query position
        _launch_combine(
            out_p,
            lse_p,
            out,
            lse,
            sinks,
            splits,
            (b, hq, sq),
            out_p.stride(),
            lse_p.stride(),
            (out.stride(0), out.stride(2), out.stride(1)),
            lse.stride(),
        )
    return out.to(q.dtype), lse


def _launch_combine(
    out_p: Tensor,
    lse_p: Tensor,
    out: Tensor,
    lse: Tensor,
    sinks: Optional[Tensor],
    splits: int,
    dims: tuple[int, int, int],
    p_str: tuple,
    q_str: tuple,
    o_str: tuple,
    l_str: tuple,
) -> None:
    """combine_kernel over rows (r0, r1, r2) of sizes `dims`. p_str: out_p's strides (split, r0, r2, r1, d)
    as fwd_kvcache lays them out, or (split, r0, 0, 0, d) for the op; q_str: lse_p's (split, r0, r1, r2)."""
    n0, n1, n2 = dims
    n_rows = n0 * n1 * n2
    if n_rows == 0:
        return
    dv = out_p.shape[-1]
    # a (BLOCK_S, BLOCK_DV) float32 tile of at most 8k values: 64 registers a thread at 4 warps
    max_rows = 16 if tuning.interpreting() else 128
    block_s = max(2, min(tuning.next_power_of_2(splits), 8192 // tuning.pad_dim(dv), max_rows))
    triton_launch.launch(
        combine_kernel,
        (n_rows,),
        out_p,
        lse_p,
        out,
        lse,
        sinks if sinks is not None else lse_p,
        splits,
        n1,
        n2,
        p_str[0],
        p_str[1],
        p_str[3],
        p_str[2],
        q_str[0],
        q_str[1],
        q_str[2],
        q_str[3],
        o_str[0],
        o_str[1],
        o_str[2],
        l_str[0],
        l_str[1],
        l_str[2],
        DV=dv,
        BLOCK_S=block_s,
        BLOCK_DV=tuning.pad_dim(dv),
        HAS_SINKS=sinks is not None,
    )


def combine(out_partial: Tensor, lse_partial: Tensor) -> tuple[Tensor, Tensor]:
    """The `flexattn::combine` op: out_partial (splits, ..., dv), lse_partial (splits, ...) float32 ->
    out (..., dv) and lse (...), both float32 and contiguous."""
    splits, dv = out_partial.shape[0], out_partial.shape[-1]
    out = out_partial.new_empty(out_partial.shape[1:], dtype=torch.float32)
    lse = lse_partial.new_empty(lse_partial.shape[1:], dtype=torch.float32)
    n_rows = lse.numel()
    if n_rows == 0:
        return out, lse
    # (splits, rows, dv) views; reshape copies only when "..." cannot be flattened in place
    op = out_partial.reshape(splits, n_rows, dv)
    lp = lse_partial.reshape(splits, n_rows)
    _launch_combine(
        op,
        lp,
        out,
        lse,
        None,
        splits,
        (n_rows, 1, 1),
        (op.stride(0), op.stride(1), 0, 0),
        (lp.stride(0), lp.stride(1), 0, 0),
        (dv, 0, 0),
        (1, 0, 0),
    )
    return out, lse
