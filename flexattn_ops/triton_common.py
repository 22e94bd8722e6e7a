"""Triton device helpers shared by the forward, backward and probs kernels.

Everything here is one step of SPEC section 4 written for a tile of scores: the score
modifications (scale, softcap, ALiBi, bias), the window mask, the dropout hash and the loop bounds
that skip key (or query) tiles with no unmasked entry. Index arguments ``i`` (query position) and
``j`` (key position) are broadcastable 2-d int32 tensors, so the same helper serves the forward
orientation (``i`` (BM, 1), ``j`` (1, BN)) and the transposed one of the dK/dV kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # the kernels run the softmax in base 2: exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def mm(a, b, PRECISION: tl.constexpr):
    """tl.dot with the backend's precision. "upcast" (the interpreter with bfloat16, whose numpy dot
    reads bfloat16 tiles as raw integers in Triton 3.9) multiplies in float32 instead."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with the accumulator passed to tl.dot: wgmma then accumulates in place instead of
    producing a second (BM, D) float32 tile and adding it (64 more registers per thread at 128 x 128)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def to_operand(x, like, PRECISION: tl.constexpr):
    """Cast a float32 tile to the dtype of the matmul operand `like` (kept float32 in "upcast" mode, where
    the interpreter's float32 -> bfloat16 conversion does not round to nearest)."""
    if PRECISION == "upcast":
        return x
    else:
        return x.to(like.dtype)


@triton.jit
def dim_mask(offs, D: tl.constexpr, BLOCK: tl.constexpr):
    """(1, BLOCK) mask of the real head-dim columns. Unpadded dims get a constant-true splat, not
    `arange < D`: Triton cannot prove the latter all-true, and a per-element mask on the contiguous
    axis stops 16-byte vector loads (8x more load instructions for bf16)."""
    if D == BLOCK:
        return tl.full([1, BLOCK], 1, tl.int1)
    else:
        return offs[None, :] < D


@triton.jit
def tile_masks(
    offs, n, offs_a, A: tl.constexpr, BLOCK_A: tl.constexpr, offs_b, B: tl.constexpr, BLOCK_B: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """Load masks of the two tiles a loop iteration reads along rows `offs` (keys for K and V, queries for Q and
    dO), of head dims A and B: the real head-dim columns, and in masked loops the rows < n."""
    mask_a = dim_mask(offs_a, A, BLOCK_A)
    mask_b = dim_mask(offs_b, B, BLOCK_B)
    if MASKED:
        mask_a = mask_a & (offs[:, None] < n)
        mask_b = mask_b & (offs[:, None] < n)
    return mask_a, mask_b


@triton.jit
def load_rows(Base, rows, n_rows, stride, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(len(rows), BLOCK_D) tile of Base[row * stride + d] for the rows < n_rows, zero in the padded head-dim
    columns. Needs n_rows >= 1 (else row -1 is read): varlen programs return before loading when their sequence
    has no rows there, and the host launches no dense kernel for empty q or k (triton_backend).

    With an unpadded head dim, rows past n_rows repeat row n_rows - 1 instead of reading zeros; callers keep
    such rows out of every result (p = 0 there, masked stores). A masked load first zero-fills its destination
    registers, and at hd128 ptxas then stalled the issue of the tile's remaining loads on register reuse,
    serialising their latency (ncu SASS, benchmarks/RESULTS.md session 6). Unmasked: H100 hd128 seqlen 512,
    one-launch backward 622 -> 580 us, forward 213 -> 207 us."""
    if D == BLOCK_D:
        r = tl.minimum(rows, n_rows - 1).to(tl.int64)
        return tl.load(Base + r[:, None] * stride + offs_d[None, :])
    else:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < D)
        return tl.load(Base + rows[:, None].to(tl.int64) * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def fmix32(x):
    """MurmurHash3's finaliser on uint32 (multiplication wraps mod 2**32), as reference.fmix32."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x85EBCA6B, tl.uint32)
    x = x ^ (x >> 13)
    x = x * tl.full([], 0xC2B2AE35, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def dropout_key(Rng):
    """key = fmix32(seed ^ fmix32(offset)) from the int64 [seed, offset] device tensor (low 32 bits each)."""
    seed = tl.load(Rng).to(tl.uint32)
    offset = tl.load(Rng + 1).to(tl.uint32)
    return fmix32(seed ^ fmix32(offset))


@triton.jit
def dropout_keep(key, bh, i, j, threshold):
    """reference.dropout_keep for a tile: True where the entry survives. ``bh`` = batch * hq + head."""
    row = fmix32(fmix32(key ^ bh.to(tl.uint32)) ^ i.to(tl.uint32))
    r = fmix32(row ^ j.to(tl.uint32))
    return (r >> 8) < threshold.to(tl.uint32)


@triton.jit
def tanh_f32(x):
    """tanh through exp (portable across Triton versions and the interpreter); saturates to +-1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def score_mods(
    qk,
    i,
    j,
    sm_scale,
    softcap,
    slope,
    bias,
    off,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Steps 1-3 of SPEC section 4 in natural-log units. Returns (s, tanh) (tanh is 0.0 without softcap)."""
    s = qk * sm_scale
    t = 0.0
    if HAS_SOFTCAP:
        t = tanh_f32(s / softcap)
        s = softcap * t
    if HAS_ALIBI:
        s = s - slope * tl.abs(i + off - j).to(tl.float32)
    if HAS_BIAS:
        s = s + bias
    return s, t


@triton.jit
def log2_scores(
    qk,
    i,
    j,
    Bias_head,
    stride_bm,
    stride_bn,
    sq,
    sk,
    sm_scale,
    softcap,
    slope,
    off,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """A tile's scores in log2 units (score_mods times log2(e)) and softcap's tanh: (s, t). The bias tile is
    Bias_head[i, j] for rows i < sq and keys j < sk; i and j broadcast against qk (S, or S^T in dK/dV)."""
    if HAS_SOFTCAP or HAS_ALIBI or HAS_BIAS:
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(Bias_head + i * stride_bm + j * stride_bn, mask=(i < sq) & (j < sk), other=0.0).to(
                tl.float32
            )
        s, t = score_mods(qk, i, j, sm_scale, softcap, slope, bias, off, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS)
        return s * LOG2E, t
    else:
        return qk * (sm_scale * LOG2E), 0.0


@triton.jit
def keep_mask(i, j, sk, off, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Step 4: key exists and lies in [i + off - left, i + off + right] (bottom-right aligned)."""
    keep = j < sk
    if HAS_LEFT:
        keep = keep & (j >= i + off - window_left)
    if HAS_RIGHT:
        keep = keep & (j <= i + off + window_right)
    return keep


@triton.jit
def tile_bounds(lo, mid_lo, r_full, hi, BLOCK: tl.constexpr):
    """Rounds a visited range [lo, hi) and its fully unmasked part [mid_lo, r_full) (all >= 0) to
    BLOCK-sized tiles: (lo, mid_lo, mid_hi, hi) with lo <= mid_lo <= mid_hi and lo, mid_lo, mid_hi
    multiples of BLOCK. The unmasked middle shrinks to whole tiles; hi stays exact (loads mask past it)."""
    lo = (lo // BLOCK) * BLOCK
    hi = tl.maximum(hi, lo)
    hi_tiles = ((hi + BLOCK - 1) // BLOCK) * BLOCK
    mid_lo = tl.minimum(tl.maximum(((mid_lo + BLOCK - 1) // BLOCK) * BLOCK, lo), hi_tiles)
    mid_hi = tl.maximum((r_full // BLOCK) * BLOCK, mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def key_tile_bounds(
    m0,
    sk,
    off,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Key tiles query rows [m0, m0 + BLOCK_M) visit: (lo, mid_lo, mid_hi, hi).

    Tiles in [lo, mid_lo) and [mid_hi, hi) need the mask; tiles in [mid_lo, mid_hi) are fully
    unmasked for every row of the block (so the loop there skips the mask arithmetic); tiles outside
    [lo, hi) hold no unmasked entry and are never loaded. All of lo, mid_lo, mid_hi are multiples of
    BLOCK_N, and every value is clamped at 0 before dividing (Triton's integer division truncates).
    """
    lo = 0
    hi = sk
    mid_lo = 0
    r_full = sk
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - window_left, 0)
        # last row of the block: keys >= its left edge are inside every row's window
        mid_lo = tl.maximum(m0 + BLOCK_M - 1 + off - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(m0 + BLOCK_M + off + window_right, sk)
        # first row of the block: keys <= its right edge are inside every row's window
        r_full = tl.minimum(tl.maximum(m0 + off + window_right + 1, 0), sk)
    return tile_bounds(lo, mid_lo, r_full, hi, BLOCK_N)


@triton.jit
def query_tile_bounds(
    n0,
    sq,
    off,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Query tiles that see key columns [n0, n0 + BLOCK_N): (lo, mid_lo, mid_hi, hi), as key_tile_bounds.

    Row i sees key j iff i >= j - off - right and i <= j - off + left. The unmasked middle needs
    every (i, j) of the tile inside the window and i < sq (rows past sq carry lse = +inf, p = 0, but the
    loads there are masked only in the masked loops).
    """
    lo = 0
    hi = sq
    mid_lo = 0
    r_full = sq
    if HAS_RIGHT:
        lo = tl.maximum(n0 - off - window_right, 0)
        mid_lo = tl.maximum(n0 + BLOCK_N - 1 - off - window_right, 0)
    if HAS_LEFT:
        hi = tl.minimum(n0 + BLOCK_N - off + window_left, sq)
        r_full = tl.minimum(tl.maximum(n0 - off + window_left + 1, 0), sq)
    return tile_bounds(lo, mid_lo, r_full, hi, BLOCK_M)


@triton.jit
def page_lookup(Table_row, n0, offs_n, mask_n, page_size, PAGE_TILE_ALIGNED: tl.constexpr):
    """Physical (page, slot in page) of the key positions `offs_n` = n0 + arange(BLOCK_N) of one sequence
    whose pages are listed in `Table_row` (the sequence's i-th page is Table_row[i]).

    PAGE_TILE_ALIGNED (set by the host when page_size % BLOCK_N == 0; n0 is a multiple of BLOCK_N): the
    tile lies inside one page, so one scalar table load per tile and contiguous slots (`page` a scalar).
    Otherwise (any page size: 1, 3, 48 ...) a table load per key (`page` (BLOCK_N,)); keys outside
    `mask_n` read page 0 (their K/V loads are masked anyway)."""
    if PAGE_TILE_ALIGNED:
        first = n0 // page_size
        page = tl.load(Table_row + first).to(tl.int64)
        return page, offs_n - first * page_size
    else:
        page = tl.load(Table_row + offs_n // page_size, mask=mask_n, other=0).to(tl.int64)
        return page, offs_n % page_size


@triton.jit
def page_offsets(page, slot, stride_pb, stride_ps):
    """int64 offsets of the (page, slot) rows of page_lookup in a cache with page / slot strides."""
    return page * stride_pb + slot.to(tl.int64) * stride_ps


@triton.jit
def paged_kv_rows(
    Table_row, n0, offs_n, sk, page_size, stride_kb, stride_ks, stride_vb, stride_vs, PAGE_TILE_ALIGNED: tl.constexpr
):
    """(BLOCK_N, 1) int64 row offsets in the paged K and V caches of key positions `offs_n` (from n0) of
    one sequence with `sk` keys: one page lookup (page_lookup) serves both."""
    page, slot = page_lookup(Table_row, n0, offs_n, offs_n < sk, page_size, PAGE_TILE_ALIGNED)
    k_rows = page_offsets(page, slot, stride_kb, stride_ks)
    v_rows = page_offsets(page, slot, stride_vb, stride_vs)
    return k_rows[:, None], v_rows[:, None]


@triton.jit
def kv_tile_rows(
    Table_row, start_n, offs_n, sk, page_size, stride_kb, stride_ks, stride_vb, stride_vs,
    BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_TILE_ALIGNED: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, 1) row offsets in K and V of the key tile at start_n: through the page table when PAGED, else
    a 64-bit scalar tile base plus 32-bit offsets inside the tile (fewer registers than 64-bit per element)."""
    if PAGED:
        return paged_kv_rows(
            Table_row, start_n, offs_n, sk, page_size, stride_kb, stride_ks, stride_vb, stride_vs, PAGE_TILE_ALIGNED
        )
    else:
        tile = tl.arange(0, BLOCK_N)[:, None]
        return start_n.to(tl.int64) * stride_ks + tile * stride_ks, start_n.to(tl.int64) * stride_vs + tile * stride_vs


@triton.jit
def seq_bounds(CuQ, CuK, SeqUsed, b, HAS_SEQUSED: tl.constexpr):
    """Sequence b of a packed batch: (q_start, sq, k_start, sk); sk is seqused_k[b] when given."""
    q_start = tl.load(CuQ + b)
    sq = tl.load(CuQ + b + 1) - q_start
    k_start = tl.load(CuK + b)
    if HAS_SEQUSED:
        sk = tl.load(SeqUsed + b)
    else:
        sk = tl.load(CuK + b + 1) - k_start
    return q_start, sq, k_start, sk


@triton.jit
def fill_rows(Ptr, stride_s, start, end, value, BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store `value` in rows [start, end) of a strided (rows, D) head. The programs along grid axis 0
    share the rows tile by tile (varlen: the query tokens past cu_seqlens_q[-1], whose count the host
    never reads)."""
    offs_d = tl.arange(0, BLOCK_D)
    fill = tl.full([BLOCK_M, BLOCK_D], value, Ptr.dtype.element_ty)
    for r0 in range(start + tl.program_id(0) * BLOCK_M, end, tl.num_programs(0) * BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < end) & dim_mask(offs_d, D, BLOCK_D)
        tl.store(Ptr + offs_m[:, None].to(tl.int64) * stride_s + offs_d[None, :], fill, mask=mask)
