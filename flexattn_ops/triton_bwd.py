"""Triton backward kernels for dense and varlen attention: deterministic by construction (no atomics).

1. delta = rowsum(dO * O) (b, hq, sq) float32, which both kinds of programs below read: computed by the dQ
   programs when the dK/dV programs run in a later launch, else by `bwd_preprocess_kernel` first.
2. `attn_bwd_kernel` runs two kinds of programs:
   - dK/dV (`_dkdv_program`): one program owns a (BLOCK_N) key tile of one (batch, kv-head group) and
     loops over the query tiles that see it (and over the query heads of its group), accumulating
     dK and dV in registers: every dK/dV element is written once, by one program.
   - dQ (`_dq_program`): one program owns a (BLOCK_M) query tile and loops over the key tiles it
     sees, accumulating dQ; with a bias that needs its gradient it also stores dS (= dbias before
     the broadcast reduction, which the host does with a torch sum).
   Dense inputs run both kinds in one launch when their tuned configs compile alike (PART "both");
   otherwise, and for varlen, one launch each.
Both kinds recompute P from (q, k, lse), so the backward costs 7 tile matmuls per tile pair
instead of FlashAttention-2's 5 with atomics; that is the price of bitwise reproducibility.
Varlen runs the same programs per sequence (VARLEN / PAGED / PAGE_TILE_ALIGNED constexprs, as the
forward: K/V pages looked up once per key tile when the page size is a multiple of BLOCK_N); a paged
cache's dK/dV go to per-(sequence, slot) rows (contiguous, no page lookup) that the host sums onto the
pages they came from.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flexattn_ops.triton_common import (
    LOG2E,
    dim_mask,
    dropout_keep,
    dropout_key,
    fill_rows,
    keep_mask,
    key_tile_bounds,
    kv_tile_rows,
    load_rows,
    log2_scores,
    mm,
    mma,
    paged_kv_rows,
    query_tile_bounds,
    seq_bounds,
    tile_masks,
    to_operand,
)


@triton.jit(do_not_specialize=["sq"])
def bwd_preprocess_kernel(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_os,
    stride_oh,
    stride_db,
    stride_ds,
    stride_dh,
    hq,
    sq,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Grid (cdiv(sq, BLOCK_M), b * hq): Delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // hq
    h = pid_bh % hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < sq) & (dim_mask(offs_d, DV, BLOCK_DV))
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :], mask=mask)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h * stride_dh + rows * stride_ds + offs_d[None, :], mask=mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * sq + offs_m, delta, mask=offs_m < sq)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    Q_head,
    DO_head,
    Lse_bh,
    Delta_bh,
    Bias_head,
    stride_qs,
    stride_dos,
    stride_bm,
    stride_bn,
    offs_n,
    lo,
    hi,
    gap_lo,
    gap_hi,
    sq,
    sk,
    off,
    sm_scale,
    softcap,
    slope,
    window_left,
    window_right,
    drop_key,
    bh,
    drop_threshold,
    drop_rescale,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dK (BLOCK_N, BLOCK_DQK) and dV (BLOCK_N, BLOCK_DV) over the query tiles of [lo, hi) outside
    [gap_lo, gap_hi) (multiples of BLOCK_M; equal for no gap).

    A causal or windowed key tile's masked query tiles lie on both sides of its unmasked ones: one loop over
    both sides holds one copy of a loop's hoisted addresses and pipeline state, not two (ptxas, hd128 causal:
    32x64 tile 392 -> 192 B of spills, 64x128 536 -> 296 B; H100 hd128 causal fwd+bwd at 8k 0.99 -> 1.08x
    FlexAttention after retuning). Works on transposed scores S^T (BLOCK_N, BLOCK_M): key index
    j = offs_n[:, None], query i = offs_m[None, :].
    """
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    j = offs_n[:, None]
    # Without causal/window masks the masked loops are the (always empty) head and the tail past the last whole
    # query tile, empty when sq % BLOCK_M == 0: then skip the tail's pipeline set-up too (~580 instructions a
    # program at hd128 64x128).
    # H100 dK/dV at seqlen 512: hd64 425 -> 362 us, hd256 632 -> 597. The other loops are not guarded: a guard
    # around the causal masked loop (never empty) cost 19-26% at hd128 2k / 8k (benchmarks/RESULTS.md, session 6).
    run = True
    if MASKED and not (HAS_LEFT or HAS_RIGHT):
        run = lo < hi
    if run:
        for start_m in range(lo, hi - (gap_hi - gap_lo), BLOCK_M):
            if MASKED and (HAS_LEFT or HAS_RIGHT):  # the unmasked call has no gap
                start_m = tl.where(start_m < gap_lo, start_m, start_m + (gap_hi - gap_lo))
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            i = offs_m[None, :]
            q_mask, do_mask = tile_masks(offs_m, sq, offs_dk, DQK, BLOCK_DQK, offs_dv, DV, BLOCK_DV, MASKED)
            tile = tl.arange(0, BLOCK_M)[:, None]
            q = tl.load(
                Q_head + start_m.to(tl.int64) * stride_qs + tile * stride_qs + offs_dk[None, :], mask=q_mask, other=0.0
            )
            do = tl.load(
                DO_head + start_m.to(tl.int64) * stride_dos + tile * stride_dos + offs_dv[None, :],
                mask=do_mask,
                other=0.0,
            )
            # lse and delta are (BLOCK_M,) vectors along the columns of S^T: 16 registers each a thread at 64x128
            # under 8 warps. Loaded where used, not at the top, the two are never live together and the hd128
            # 64x128 loop spills nothing (ptxas: 156 -> 96 B, all outside the query-tile loops); H100 backward
            # kernels at hd128 2k / 8k: 1815 -> 1711 / 6724 -> 6432 us (benchmarks/RESULTS.md, session 5).
            qk_t = mm(k, tl.trans(q), PRECISION)
            if MASKED:  # rows past sq: lse = +inf makes p = 0 there
                lse = tl.load(Lse_bh + offs_m, mask=offs_m < sq, other=float("inf"))
            else:
                lse = tl.load(Lse_bh + offs_m)
            # a fully masked row has lse = -inf and must give p = 0: use +inf there
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
            s, t = log2_scores(
                qk_t, i, j, Bias_head, stride_bm, stride_bn, sq, sk, sm_scale, softcap, slope, off,
                HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
            )  # fmt: skip
            p_t = tl.math.exp2(s - lse2[None, :])
            if MASKED:
                p_t = tl.where(keep_mask(i, j, sk, off, window_left, window_right, HAS_LEFT, HAS_RIGHT), p_t, 0.0)
            dp_t = mm(v, tl.trans(do), PRECISION)
            if HAS_DROPOUT:
                kept = dropout_keep(drop_key, bh, i, j, drop_threshold)
                pd_t = tl.where(kept, p_t * drop_rescale, 0.0)
                dp_t = tl.where(kept, dp_t * drop_rescale, 0.0)
            else:
                pd_t = p_t
            dv = mma(to_operand(pd_t, do, PRECISION), do, dv, PRECISION)
            if MASKED:
                delta = tl.load(Delta_bh + offs_m, mask=offs_m < sq, other=0.0)
            else:
                delta = tl.load(Delta_bh + offs_m)
            ds_t = p_t * (dp_t - delta[None, :])
            if HAS_SOFTCAP:
                ds_t = ds_t * (1.0 - t * t)
            dk = mma(to_operand(ds_t, q, PRECISION), q, dk, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_program(
    pid_n,
    pid_bg,
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV_out,
    Bias,
    Alibi,
    Rng,
    CuQ,
    CuK,
    SeqUsed,
    Table,
    stride_tb,
    page_size,
    total_q,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ab,
    hq,
    n_groups,
    group,
    q_per_k,
    q_per_v,
    sq,
    sk,
    sm_scale,
    softcap,
    window_left,
    window_right,
    drop_threshold,
    drop_rescale,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_SEQUSED: tl.constexpr,
    PAGE_TILE_ALIGNED: tl.constexpr,
):
    """dK/dV of key tile pid_n (BLOCK_N keys) of (batch, group) pid_bg = b * n_groups + g: sums over query
    heads g*group .. g*group+group-1.

    With hk == hv the groups are the kv heads (group = hq // hk) and DK/DV are the real (b, sk, hk, d)
    gradients; otherwise group = 1 and DK/DV are per-query-head float32 buffers the host reduces.
    VARLEN (layouts as attn_fwd_kernel): grid (cdiv(max_seqlen_k, BLOCK_N), batch * n_groups); DK/DV are
    packed like K/V (total_k, ., d), or with PAGED per-sequence slots (batch, max_pages * page_size, ., d)
    that the host sums onto the pages. Rows a program does not own (keys past seqused_k or
    cu_seqlens_k[-1], unused slots) are never written: the host zero-fills DK/DV for varlen.
    """
    b = pid_bg // n_groups
    g_idx = pid_bg % n_groups
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    cols = offs_n[:, None].to(tl.int64)
    if VARLEN:
        q_start, sq, k_start, sk = seq_bounds(CuQ, CuK, SeqUsed, b, HAS_SEQUSED)
        if n0 >= sk:
            return
        Q_seq = Q + q_start.to(tl.int64) * stride_qs
        DO_seq = DO + q_start.to(tl.int64) * stride_dos
        if PAGED:
            dk_rows = b.to(tl.int64) * stride_dkb + cols * stride_dks
            dv_rows = b.to(tl.int64) * stride_dvb + cols * stride_dvs
        else:
            K_seq = K + k_start.to(tl.int64) * stride_ks
            V_seq = V + k_start.to(tl.int64) * stride_vs
            dk_rows = (k_start + cols) * stride_dks
            dv_rows = (k_start + cols) * stride_dvs
    else:
        Q_seq = Q + b.to(tl.int64) * stride_qb
        DO_seq = DO + b.to(tl.int64) * stride_dob
        K_seq = K + b.to(tl.int64) * stride_kb
        V_seq = V + b.to(tl.int64) * stride_vb
        dk_rows = b.to(tl.int64) * stride_dkb + cols * stride_dks
        dv_rows = b.to(tl.int64) * stride_dvb + cols * stride_dvs
    off = sk - sq
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    h0 = g_idx * group
    if PAGED:
        k_rows, v_rows = paged_kv_rows(
            Table + b * stride_tb,
            n0,
            offs_n,
            sk,
            page_size,
            stride_kb,
            stride_ks,
            stride_vb,
            stride_vs,
            PAGE_TILE_ALIGNED,
        )
        k = tl.load(
            K + (h0 // q_per_k) * stride_kh + k_rows + offs_dk[None, :],
            mask=(offs_n[:, None] < sk) & (dim_mask(offs_dk, DQK, BLOCK_DQK)),
            other=0.0,
        )
        v = tl.load(
            V + (h0 // q_per_v) * stride_vh + v_rows + offs_dv[None, :],
            mask=(offs_n[:, None] < sk) & (dim_mask(offs_dv, DV, BLOCK_DV)),
            other=0.0,
        )
    else:  # keys past sk (last tile) only reach masked loops, where p = 0 for them
        k = load_rows(K_seq + (h0 // q_per_k) * stride_kh, offs_n, sk, stride_ks, offs_dk, DQK, BLOCK_DQK)
        v = load_rows(V_seq + (h0 // q_per_v) * stride_vh, offs_n, sk, stride_vs, offs_dv, DV, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, mid_lo, mid_hi, hi = query_tile_bounds(
        n0, sq, off, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    # a key tile running past sk needs the j < sk mask in every query tile
    mid_hi = tl.where(n0 + BLOCK_N > sk, mid_lo, mid_hi)
    drop_key = 0
    if HAS_DROPOUT:
        drop_key = dropout_key(Rng)
    for g in range(group):
        h = h0 + g
        bh = b * hq + h
        Q_head = Q_seq + h * stride_qh
        DO_head = DO_seq + h * stride_doh
        if VARLEN:  # Lse, Delta (hq, total_q)
            Lse_bh = Lse + h.to(tl.int64) * total_q + q_start
            Delta_bh = Delta + h.to(tl.int64) * total_q + q_start
        else:
            Lse_bh = Lse + bh.to(tl.int64) * sq
            Delta_bh = Delta + bh.to(tl.int64) * sq
        Bias_head = Bias + b.to(tl.int64) * stride_bb + h * stride_bh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + b * stride_ab + h).to(tl.float32)
        # three ranges of query tiles: masked [lo, mid_lo), unmasked [mid_lo, mid_hi), masked [mid_hi, hi). With
        # causal or window masks the two masked ranges run as one loop (part 0) that skips the unmasked tiles;
        # without, [lo, mid_lo) is empty and the tail comes last (that order compiles with the fewest spills)
        for part in tl.static_range(3):
            gap_lo = mid_lo
            gap_hi = mid_lo
            if part == 0:
                part_lo = lo
                part_hi = mid_lo
                if HAS_LEFT or HAS_RIGHT:
                    part_hi = hi
                    gap_hi = mid_hi
            elif part == 1:
                part_lo = mid_lo
                part_hi = mid_hi
            else:
                part_lo = mid_hi
                part_hi = hi
            if part < 2 or not (HAS_LEFT or HAS_RIGHT):
                dk, dv = _dkdv_inner(
                    dk,
                    dv,
                    k,
                    v,
                    Q_head,
                    DO_head,
                    Lse_bh,
                    Delta_bh,
                    Bias_head,
                    stride_qs,
                    stride_dos,
                    stride_bm,
                    stride_bn,
                    offs_n,
                    part_lo,
                    part_hi,
                    gap_lo,
                    gap_hi,
                    sq,
                    sk,
                    off,
                    sm_scale,
                    softcap,
                    slope,
                    window_left,
                    window_right,
                    drop_key,
                    bh,
                    drop_threshold,
                    drop_rescale,
                    DQK,
                    DV,
                    BLOCK_M,
                    BLOCK_DQK,
                    BLOCK_DV,
                    part != 1,
                    HAS_LEFT,
                    HAS_RIGHT,
                    HAS_SOFTCAP,
                    HAS_ALIBI,
                    HAS_BIAS,
                    HAS_DROPOUT,
                    PRECISION,
                )
    dk = dk * sm_scale
    n_mask = offs_n[:, None] < sk
    tl.store(
        DK + g_idx * stride_dkh + dk_rows + offs_dk[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_mask & (dim_mask(offs_dk, DQK, BLOCK_DQK)),
    )
    tl.store(
        DV_out + g_idx * stride_dvh + dv_rows + offs_dv[None, :],
        dv.to(DV_out.dtype.element_ty),
        mask=n_mask & (dim_mask(offs_dv, DV, BLOCK_DV)),
    )


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    K_head,
    V_head,
    Bias_head,
    DBias_bh,
    Table_row,
    page_size,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_bm,
    stride_bn,
    offs_m,
    lo,
    hi,
    sq,
    sk,
    off,
    sm_scale,
    softcap,
    slope,
    window_left,
    window_right,
    drop_key,
    bh,
    drop_threshold,
    drop_rescale,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_TILE_ALIGNED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate dQ (BLOCK_M, BLOCK_DQK) over key tiles [lo, hi); store dS tiles when HAS_DBIAS."""
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    i = offs_m[:, None]
    if lo < hi:  # as _dkdv_inner: an empty range skips the pipeline set-up
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            j = offs_n[None, :]
            k_mask, v_mask = tile_masks(offs_n, sk, offs_dk, DQK, BLOCK_DQK, offs_dv, DV, BLOCK_DV, MASKED)
            k_rows, v_rows = kv_tile_rows(
                Table_row, start_n, offs_n, sk, page_size, stride_kb, stride_ks, stride_vb, stride_vs, BLOCK_N, PAGED,
                PAGE_TILE_ALIGNED,
            )  # fmt: skip
            k = tl.load(K_head + k_rows + offs_dk[None, :], mask=k_mask, other=0.0)
            v = tl.load(V_head + v_rows + offs_dv[None, :], mask=v_mask, other=0.0)
            qk = mm(q, tl.trans(k), PRECISION)
            s, t = log2_scores(
                qk, i, j, Bias_head, stride_bm, stride_bn, sq, sk, sm_scale, softcap, slope, off,
                HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
            )  # fmt: skip
            p = tl.math.exp2(s - lse2[:, None])
            if MASKED:
                p = tl.where(keep_mask(i, j, sk, off, window_left, window_right, HAS_LEFT, HAS_RIGHT), p, 0.0)
            dp = mm(do, tl.trans(v), PRECISION)
            if HAS_DROPOUT:
                dp = tl.where(dropout_keep(drop_key, bh, i, j, drop_threshold), dp * drop_rescale, 0.0)
            ds = p * (dp - delta[:, None])
            if HAS_DBIAS:
                tl.store(DBias_bh + i.to(tl.int64) * sk + j, ds, mask=(i < sq) & (j < sk))
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = mma(to_operand(ds, k, PRECISION), k, dq, PRECISION)
    return dq


@triton.jit
def _dq_program(
    pid_m,
    pid_bh,
    pad_seq,
    Q,
    K,
    V,
    Out,
    DO,
    Lse,
    Delta,
    DQ,
    DBias,
    Bias,
    Alibi,
    Rng,
    CuQ,
    CuK,
    SeqUsed,
    Table,
    stride_tb,
    page_size,
    total_q,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ab,
    hq,
    q_per_k,
    q_per_v,
    sq,
    sk,
    sm_scale,
    softcap,
    window_left,
    window_right,
    drop_threshold,
    drop_rescale,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_SEQUSED: tl.constexpr,
    PAGE_TILE_ALIGNED: tl.constexpr,
    WRITES_DELTA: tl.constexpr,
):
    """dQ of query tile pid_m (BLOCK_M rows) of (batch, head) pid_bh = b * hq + h. DQ (b, sq, hq, dqk);
    DBias (b, hq, sq, sk) float32 when HAS_DBIAS.

    VARLEN: layouts as attn_fwd_kernel (DQ (total_q, hq, dqk)); programs of the extra sequence
    b = pad_seq (= batch) write dq 0 for the rows past cu_seqlens_q[-1].
    """
    b = pid_bh // hq
    h = pid_bh % hq
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if b == pad_seq:
            pad0 = tl.load(CuQ + b)
            fill_rows(DQ + h * stride_dqh, stride_dqs, pad0, total_q, 0.0, BLOCK_M, DQK, BLOCK_DQK)
            return
        q_start, sq, k_start, sk = seq_bounds(CuQ, CuK, SeqUsed, b, HAS_SEQUSED)
        if m0 >= sq:
            return
        row0 = q_start.to(tl.int64)
        Lse_row = Lse + h.to(tl.int64) * total_q + q_start
        Delta_row = Delta + h.to(tl.int64) * total_q + q_start
        if PAGED:  # page rows carry the offsets (_dq_inner)
            K_seq = K
            V_seq = V
        else:
            K_seq = K + k_start.to(tl.int64) * stride_ks
            V_seq = V + k_start.to(tl.int64) * stride_vs
        Q_seq = Q + row0 * stride_qs
        O_seq = Out + row0 * stride_os
        DO_seq = DO + row0 * stride_dos
        DQ_seq = DQ + row0 * stride_dqs
    else:
        Lse_row = Lse + pid_bh.to(tl.int64) * sq
        Delta_row = Delta + pid_bh.to(tl.int64) * sq
        K_seq = K + b.to(tl.int64) * stride_kb
        V_seq = V + b.to(tl.int64) * stride_vb
        Q_seq = Q + b.to(tl.int64) * stride_qb
        O_seq = Out + b.to(tl.int64) * stride_ob
        DO_seq = DO + b.to(tl.int64) * stride_dob
        DQ_seq = DQ + b.to(tl.int64) * stride_dqb
    Table_row = Table + b * stride_tb
    off = sk - sq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m[:, None].to(tl.int64)
    row_ok = offs_m[:, None] < sq
    # rows past sq have lse = +inf below, so p = 0 and ds = 0 there whatever q and do hold
    q = load_rows(Q_seq + h * stride_qh, offs_m, sq, stride_qs, offs_dk, DQK, BLOCK_DQK)
    do = load_rows(DO_seq + h * stride_doh, offs_m, sq, stride_dos, offs_dv, DV, BLOCK_DV)
    lse = tl.load(Lse_row + offs_m, mask=offs_m < sq, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    if WRITES_DELTA:
        # delta = rowsum(dO * O) here instead of in bwd_preprocess_kernel: the dK/dV launch that follows reads
        # it, and one launch and one more pass over dO are saved (dO is loaded here anyway)
        o = load_rows(O_seq + h * stride_oh, offs_m, sq, stride_os, offs_dv, DV, BLOCK_DV)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(Delta_row + offs_m, delta, mask=offs_m < sq)
    else:
        delta = tl.load(Delta_row + offs_m, mask=offs_m < sq, other=0.0)
    K_head = K_seq + (h // q_per_k) * stride_kh
    V_head = V_seq + (h // q_per_v) * stride_vh
    Bias_head = Bias + b.to(tl.int64) * stride_bb + h * stride_bh
    DBias_bh = DBias + pid_bh.to(tl.int64) * sq * sk
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h).to(tl.float32)
    drop_key = 0
    if HAS_DROPOUT:
        drop_key = dropout_key(Rng)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    lo, mid_lo, mid_hi, hi = key_tile_bounds(
        m0, sk, off, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K_head,
        V_head,
        Bias_head,
        DBias_bh,
        Table_row,
        page_size,
        stride_kb,
        stride_ks,
        stride_vb,
        stride_vs,
        stride_bm,
        stride_bn,
        offs_m,
        lo,
        mid_lo,
        sq,
        sk,
        off,
        sm_scale,
        softcap,
        slope,
        window_left,
        window_right,
        drop_key,
        pid_bh,
        drop_threshold,
        drop_rescale,
        DQK,
        DV,
        BLOCK_N,
        BLOCK_DQK,
        BLOCK_DV,
        True,
        PAGED,
        PAGE_TILE_ALIGNED,
        HAS_LEFT,
        HAS_RIGHT,
        HAS_SOFTCAP,
        HAS_ALIBI,
        HAS_BIAS,
        HAS_DBIAS,
        HAS_DROPOUT,
        PRECISION,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K_head,
        V_head,
        Bias_head,
        DBias_bh,
        Table_row,
        page_size,
        stride_kb,
        stride_ks,
        stride_vb,
        stride_vs,
        stride_bm,
        stride_bn,
        offs_m,
        mid_lo,
        mid_hi,
        sq,
        sk,
        off,
        sm_scale,
        softcap,
        slope,
        window_left,
        window_right,
        drop_key,
        pid_bh,
        drop_threshold,
        drop_rescale,
        DQK,
        DV,
        BLOCK_N,
        BLOCK_DQK,
        BLOCK_DV,
        False,
        PAGED,
        PAGE_TILE_ALIGNED,
        HAS_LEFT,
        HAS_RIGHT,
        HAS_SOFTCAP,
        HAS_ALIBI,
        HAS_BIAS,
        HAS_DBIAS,
        HAS_DROPOUT,
        PRECISION,
    )
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K_head,
        V_head,
        Bias_head,
        DBias_bh,
        Table_row,
        page_size,
        stride_kb,
        stride_ks,
        stride_vb,
        stride_vs,
        stride_bm,
        stride_bn,
        offs_m,
        mid_hi,
        hi,
        sq,
        sk,
        off,
        sm_scale,
        softcap,
        slope,
        window_left,
        window_right,
        drop_key,
        pid_bh,
        drop_threshold,
        drop_rescale,
        DQK,
        DV,
        BLOCK_N,
        BLOCK_DQK,
        BLOCK_DV,
        True,
        PAGED,
        PAGE_TILE_ALIGNED,
        HAS_LEFT,
        HAS_RIGHT,
        HAS_SOFTCAP,
        HAS_ALIBI,
        HAS_BIAS,
        HAS_DBIAS,
        HAS_DROPOUT,
        PRECISION,
    )
    dq = dq * sm_scale
    tl.store(
        DQ_seq + h * stride_dqh + rows * stride_dqs + offs_dk[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok & (dim_mask(offs_dk, DQK, BLOCK_DQK)),
    )


@triton.jit(do_not_specialize=["sq", "sk", "total_q", "window_left", "window_right", "drop_threshold", "n_key_tiles"])
def attn_bwd_kernel(
    Q,
    K,
    V,
    Out,
    DO,
    Lse,
    Delta,
    DQ,
    DK,
    DV_out,
    DBias,
    Bias,
    Alibi,
    Rng,
    CuQ,
    CuK,
    SeqUsed,
    Table,
    stride_tb,
    page_size,
    total_q,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ab,
    hq,
    n_groups,
    group,
    q_per_k,
    q_per_v,
    sq,
    sk,
    sm_scale,
    softcap,
    window_left,
    window_right,
    drop_threshold,
    drop_rescale,
    n_key_tiles,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    DKDV_BLOCK_M: tl.constexpr,
    DKDV_BLOCK_N: tl.constexpr,
    DQ_BLOCK_M: tl.constexpr,
    DQ_BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_SEQUSED: tl.constexpr,
    PAGE_TILE_ALIGNED: tl.constexpr,
    PART: tl.constexpr,
):
    """The dK/dV and dQ programs, launched by PART (a constexpr, so each launch compiles one part's code alone):

    - "dkdv": grid (cdiv(sk, DKDV_BLOCK_N), b * n_groups), one program per key tile of a (batch, group);
    - "dq": grid (cdiv(sq, DQ_BLOCK_M), n_seq * hq), one program per query tile of a (batch, head), the
      costliest (last) tiles first; varlen has n_seq = batch + 1 (the padding rows' sequence). It writes
      Delta for the "dkdv" launch after it;
    - "both" (dense only; Delta from bwd_preprocess_kernel): grid (n_key_tiles + cdiv(sq, DQ_BLOCK_M) * group,
      b * n_groups). Each (batch, group) row runs its dK/dV programs, then the dQ programs of its query
      heads: adjacent in launch order, so both read Q, K, V and dO while they are in L2 instead of each part
      streaming them from DRAM (hd128 seqlen 512 on an H100: 637 vs 677 us; elsewhere two launches can be
      faster, so the choice is tuned).
    """
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    if PART == "dkdv":
        kv_program = True
    elif PART == "dq":
        kv_program = False
    else:
        kv_program = pid0 < n_key_tiles  # a run-time branch only in the one-launch kernel
    if kv_program:
        _dkdv_program(
            pid0,
            pid1,
            Q,
            K,
            V,
            DO,
            Lse,
            Delta,
            DK,
            DV_out,
            Bias,
            Alibi,
            Rng,
            CuQ,
            CuK,
            SeqUsed,
            Table,
            stride_tb,
            page_size,
            total_q,
            stride_qb,
            stride_qs,
            stride_qh,
            stride_kb,
            stride_ks,
            stride_kh,
            stride_vb,
            stride_vs,
            stride_vh,
            stride_dob,
            stride_dos,
            stride_doh,
            stride_dkb,
            stride_dks,
            stride_dkh,
            stride_dvb,
            stride_dvs,
            stride_dvh,
            stride_bb,
            stride_bh,
            stride_bm,
            stride_bn,
            stride_ab,
            hq,
            n_groups,
            group,
            q_per_k,
            q_per_v,
            sq,
            sk,
            sm_scale,
            softcap,
            window_left,
            window_right,
            drop_threshold,
            drop_rescale,
            DQK,
            DV,
            DKDV_BLOCK_M,
            DKDV_BLOCK_N,
            BLOCK_DQK,
            BLOCK_DV,
            HAS_LEFT,
            HAS_RIGHT,
            HAS_SOFTCAP,
            HAS_ALIBI,
            HAS_BIAS,
            HAS_DROPOUT,
            PRECISION,
            VARLEN,
            PAGED,
            HAS_SEQUSED,
            PAGE_TILE_ALIGNED,
        )
    else:
        if PART == "dq":
            pid_m = tl.num_programs(0) - 1 - pid0
            pid_bh = pid1
            pad_seq = tl.num_programs(1) // hq - 1
        else:
            r = pid0 - n_key_tiles  # query tile r // group (costliest first) of head r % group in the group
            n_q_tiles = (tl.num_programs(0) - n_key_tiles) // group
            pid_m = n_q_tiles - 1 - r // group
            h = (pid1 % n_groups) * group + r % group
            pid_bh = (pid1 // n_groups) * hq + h
            pad_seq = 0
        _dq_program(
            pid_m,
            pid_bh,
            pad_seq,
            Q,
            K,
            V,
            Out,
            DO,
            Lse,
            Delta,
            DQ,
            DBias,
            Bias,
            Alibi,
            Rng,
            CuQ,
            CuK,
            SeqUsed,
            Table,
            stride_tb,
            page_size,
            total_q,
            stride_qb,
            stride_qs,
            stride_qh,
            stride_kb,
            stride_ks,
            stride_kh,
            stride_vb,
            stride_vs,
            stride_vh,
            stride_ob,
            stride_os,
            stride_oh,
            stride_dob,
            stride_dos,
            stride_doh,
            stride_dqb,
            stride_dqs,
            stride_dqh,
            stride_bb,
            stride_bh,
            stride_bm,
            stride_bn,
            stride_ab,
            hq,
            q_per_k,
            q_per_v,
            sq,
            sk,
            sm_scale,
            softcap,
            window_left,
            window_right,
            drop_threshold,
            drop_rescale,
            DQK,
            DV,
            DQ_BLOCK_M,
            DQ_BLOCK_N,
            BLOCK_DQK,
            BLOCK_DV,
            HAS_LEFT,
            HAS_RIGHT,
            HAS_SOFTCAP,
            HAS_ALIBI,
            HAS_BIAS,
            HAS_DBIAS,
            HAS_DROPOUT,
            PRECISION,
            VARLEN,
            PAGED,
            HAS_SEQUSED,
            PAGE_TILE_ALIGNED,
            PART == "dq",
        )
