"""Triton forward kernel (and the probs kernel) for dense and varlen attention.

One program computes a (BLOCK_M, dv) output tile of one (batch, query head): it streams the key
tiles the window allows (online softmax in base 2) in three loops: masked left edge, unmasked
middle, masked right edge, so a causal or windowed row block never touches a fully masked tile.
Head dims are padded to powers of two (BLOCK_DQK, BLOCK_DV) with load masks, so any dqk/dv from
8 to 256 runs. Varlen (VARLEN / PAGED constexprs, False for dense inputs, where that code compiles
away) changes only where a program's rows and keys start and how many there are: each program reads
its sequence's bounds from cu_seqlens on the device, and paged keys map position j to slot
j % page_size of page block_table[seq, j // page_size]: one table load per key tile when the page
size is a multiple of BLOCK_N (PAGE_TILE_ALIGNED, then a tile lies in one page), one per key otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flexattn_ops.triton_common import (
    LN2,
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
    score_mods,
    seq_bounds,
    tile_masks,
    to_operand,
)


@triton.jit
def _fwd_inner(
    acc,
    m_i,
    l_i,
    q,
    K_head,
    V_head,
    Bias_head,
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
    HAS_DROPOUT: tl.constexpr,
    PLAIN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    i = offs_m[:, None]
    if lo < hi:  # an empty range (e.g. the masked tail when sk % BLOCK_N == 0) skips the pipeline set-up too
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
            qk = mm(q, tl.trans(k), PRECISION)
            if PLAIN and not MASKED:
                # no score mods, scale > 0, no mask: max over raw qk (BM multiplies, not BM x BN) and one
                # FMA per score for the exponent; every score is finite, so m_new is too
                qk_scale = sm_scale * LOG2E
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.math.exp2(qk * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
            else:
                s, _t = log2_scores(
                    qk, i, j, Bias_head, stride_bm, stride_bn, sq, sk, sm_scale, softcap, slope, off,
                    HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                )  # fmt: skip
                if MASKED:
                    keep = keep_mask(i, j, sk, off, window_left, window_right, HAS_LEFT, HAS_RIGHT)
                    s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a row with every key so far masked has m_new = -inf: subtract 0 instead (no inf - inf NaN)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_DROPOUT:
                p = tl.where(dropout_keep(drop_key, bh, i, j, drop_threshold), p, 0.0)
            v = tl.load(V_head + v_rows + offs_dv[None, :], mask=v_mask, other=0.0)
            acc = mma(to_operand(p, v, PRECISION), v, acc * alpha[:, None], PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["sq", "sk", "total_q", "window_left", "window_right", "drop_threshold"])
def attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    Bias,
    Alibi,
    Sinks,
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
    HAS_SINKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PLAIN: tl.constexpr,
    PRECISION: tl.constexpr,
    VARLEN: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_SEQUSED: tl.constexpr,
    PAGE_TILE_ALIGNED: tl.constexpr,
):
    """Dense: grid (cdiv(sq, BLOCK_M), b * hq); Out (b, sq, hq, dv) strided; Lse (b, hq, sq) contiguous float32.

    VARLEN: grid (cdiv(max_seqlen_q, BLOCK_M), (batch + 1) * hq); Q (total_q, hq, dqk), Out (total_q, hq, dv)
    (stride_qb = stride_ob = 0), Lse (hq, total_q); sequence b is rows CuQ[b]:CuQ[b + 1] of q and attends
    to its sk = SeqUsed[b] (or CuK[b + 1] - CuK[b]) keys: packed rows from CuK[b] of K/V (total_k, h, d),
    or with PAGED the pages Table[b, :] of K/V (num_pages, page_size, h, d), looked up once per key tile
    with PAGE_TILE_ALIGNED (page_size % BLOCK_N == 0), else once per key. Programs of the extra
    sequence b = batch write out 0, lse -inf for the rows past CuQ[batch]; sq, sk are unused.
    """
    # Heaviest causal row blocks (the last ones) go first: better tail balance across the 132 SMs.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // hq
    h = pid_bh % hq
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if b == tl.num_programs(1) // hq - 1:
            pad0 = tl.load(CuQ + b)
            fill_rows(Out + h * stride_oh, stride_os, pad0, total_q, 0.0, BLOCK_M, DV, BLOCK_DV)
            fill_rows(Lse + h.to(tl.int64) * total_q, 1, pad0, total_q, float("-inf"), BLOCK_M, 1, 1)
            return
        q_start, sq, k_start, sk = seq_bounds(CuQ, CuK, SeqUsed, b, HAS_SEQUSED)
        if m0 >= sq:
            return
        Q_seq = Q + q_start.to(tl.int64) * stride_qs
        O_seq = Out + q_start.to(tl.int64) * stride_os
        Lse_row = Lse + h.to(tl.int64) * total_q + q_start
        if PAGED:  # page rows carry the offsets (_fwd_inner)
            K_seq = K
            V_seq = V
        else:
            K_seq = K + k_start.to(tl.int64) * stride_ks
            V_seq = V + k_start.to(tl.int64) * stride_vs
    else:
        Q_seq = Q + b.to(tl.int64) * stride_qb
        O_seq = Out + b.to(tl.int64) * stride_ob
        Lse_row = Lse + pid_bh.to(tl.int64) * sq
        K_seq = K + b.to(tl.int64) * stride_kb
        V_seq = V + b.to(tl.int64) * stride_vb
    Table_row = Table + b * stride_tb
    off = sk - sq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    # rows past sq are never stored; their (repeated) q only feeds their own discarded scores
    q = load_rows(Q_seq + h * stride_qh, offs_m, sq, stride_qs, offs_dk, DQK, BLOCK_DQK)
    K_head = K_seq + (h // q_per_k) * stride_kh
    V_head = V_seq + (h // q_per_v) * stride_vh
    Bias_head = Bias + b.to(tl.int64) * stride_bb + h * stride_bh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h).to(tl.float32)
    drop_key = 0
    if HAS_DROPOUT:
        drop_key = dropout_key(Rng)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, mid_lo, mid_hi, hi = key_tile_bounds(
        m0, sk, off, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    # masked left edge, unmasked middle, masked right edge (tiles outside [lo, hi) are skipped)
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        K_head,
        V_head,
        Bias_head,
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
        HAS_DROPOUT,
        PLAIN,
        PRECISION,
    )
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        K_head,
        V_head,
        Bias_head,
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
        HAS_DROPOUT,
        PLAIN,
        PRECISION,
    )
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        K_head,
        V_head,
        Bias_head,
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
        HAS_DROPOUT,
        PLAIN,
        PRECISION,
    )
    if HAS_SINKS:
        # the sink is one more logit in the denominator (and in lse), with no value row
        sink = tl.load(Sinks + h).to(tl.float32) * LOG2E
        m_f = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_f)
        l_i = l_i * alpha + tl.math.exp2(sink - m_f)
        acc = acc * alpha[:, None]
        m_i = m_f
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (drop_rescale / l_safe)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = O_seq + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os
    tl.store(
        o_ptrs + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < sq) & (dim_mask(offs_dv, DV, BLOCK_DV)),
    )
    tl.store(Lse_row + offs_m, lse, mask=offs_m < sq)


@triton.jit(do_not_specialize=["sq", "sk", "window_left", "window_right", "drop_threshold"])
def attn_probs_kernel(
    Q,
    K,
    Lse,
    P,
    Bias,
    Alibi,
    Rng,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ab,
    hq,
    q_per_k,
    sq,
    sk,
    sm_scale,
    softcap,
    window_left,
    window_right,
    drop_threshold,
    DQK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(sq, BM), cdiv(sk, BN), b * hq): P (b, hq, sq, sk) float32 = exp(s - lse), dropped entries negated."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // hq
    h = pid_bh % hq
    off = sk - sq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DQK)
    i = offs_m[:, None]
    j = offs_n[None, :]
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + h * stride_qh + i * stride_qs + offs_d[None, :],
        mask=(i < sq) & (dim_mask(offs_d, DQK, BLOCK_DQK)),
        other=0.0,
    )
    k = tl.load(
        K + b.to(tl.int64) * stride_kb + (h // q_per_k) * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
        mask=(offs_n[:, None] < sk) & (dim_mask(offs_d, DQK, BLOCK_DQK)),
        other=0.0,
    )
    qk = mm(q, tl.trans(k), PRECISION)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(
            Bias + b.to(tl.int64) * stride_bb + h * stride_bh + i * stride_bm + j * stride_bn,
            mask=(i < sq) & (j < sk),
            other=0.0,
        ).to(tl.float32)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h).to(tl.float32)
    s, _t = score_mods(qk, i, j, sm_scale, softcap, slope, bias, off, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS)
    keep = keep_mask(i, j, sk, off, window_left, window_right, HAS_LEFT, HAS_RIGHT)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * sq + offs_m, mask=offs_m < sq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    if HAS_DROPOUT:
        p = tl.where(dropout_keep(dropout_key(Rng), pid_bh, i, j, drop_threshold), p, -p)
    tl.store(P + pid_bh.to(tl.int64) * sq * sk + i.to(tl.int64) * sk + j, p, mask=(i < sq) & (j < sk))
