"""Reference backend: every op in plain PyTorch, float32 math, blocked over query rows.

Runs on any device (it is the CPU implementation). Memory stays O(Q_BLOCK x seqlen_k) per
(batch, head): scores are never materialised for all query rows at once. Dense, varlen and
paged inputs all reduce to one core (`_forward_core` / `_backward_core`) that attends a batch of
query rows to a batch of key rows, with a `RowIndex` telling which sequence and position each
row and key belongs to; masking, ALiBi and dropout are all written in terms of that index.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from flexattn_ops.params import AttnArgs, KVCacheArgs

# Rows per block: a (batch, heads, 128, seqlen_k) float32 score tile; 128 keeps the tile within
# a few MB for seqlen_k up to 8k while amortising the per-block Python overhead.
Q_BLOCK = 128

MASK32 = 0xFFFFFFFF


@dataclass
class RowIndex:
    """Where each query row and key sits: all int64 / bool, shapes (B, Sq) and (B, Sk).

    ``seq_q``/``seq_k`` are sequence ids (the batch index for dense inputs; -1 marks query rows
    outside every sequence), ``pos_q``/``pos_k`` positions inside the sequence, ``aligned_q`` the
    query position shifted by ``seqlen_k - seqlen_q`` (bottom-right alignment) and ``valid_k``
    whether a key exists (within ``seqused_k``). ``same_seq_needed`` is False for dense inputs,
    where every key of a batch row belongs to the same sequence. ``offset`` is the alignment
    shift when it is one Python int for every row (dense inputs): windows then bound each query
    block's keys to a range known on the host, and the keys outside it are never computed.
    """

    seq_q: Tensor
    pos_q: Tensor
    aligned_q: Tensor
    seq_k: Tensor
    pos_k: Tensor
    valid_k: Tensor
    same_seq_needed: bool
    offset: Optional[int] = None

    def keys(self, cols: slice) -> RowIndex:
        """The index restricted to the keys `cols`."""
        return replace(self, seq_k=self.seq_k[:, cols], pos_k=self.pos_k[:, cols], valid_k=self.valid_k[:, cols])

    def key_range(self, rows: slice, a: AttnArgs, sk: int) -> slice:
        """The keys some row of `rows` may attend to: all of them unless a window and a uniform
        offset bound them (causal halves the work, a window of w keys makes it O(w) per row)."""
        if self.offset is None:
            return slice(0, sk)
        lo = 0 if a.window_left < 0 else min(max(0, rows.start + self.offset - a.window_left), sk)
        hi = sk if a.window_right < 0 else min(sk, rows.stop + self.offset + a.window_right)
        return slice(lo, max(hi, lo + 1)) if lo < sk else slice(sk - 1, sk)  # >= 1 key: a masked row, not an empty one


def dense_index(b: int, sq: int, sk: int, device: torch.device) -> RowIndex:
    ar_q = torch.arange(sq, device=device).expand(b, sq)
    ar_k = torch.arange(sk, device=device).expand(b, sk)
    seq = torch.arange(b, device=device)[:, None]
    return RowIndex(
        seq.expand(b, sq),
        ar_q,
        ar_q + (sk - sq),
        seq.expand(b, sk),
        ar_k,
        torch.ones(b, sk, dtype=torch.bool, device=device),
        False,
        sk - sq,
    )


def _segments(cu: Tensor, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence id, position within it, and validity of each of `total` packed tokens."""
    cu = cu.long()
    t = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)
    valid = seq < cu.shape[0] - 1
    seq = seq.clamp(max=cu.shape[0] - 2)
    return seq, t - cu[seq], valid


def varlen_index(a: AttnArgs, total_q: int, keys_per_seq: Optional[int], total_k: int) -> RowIndex:
    """Index for packed queries; keys are packed (``keys_per_seq`` None) or paged, in which case
    the gathered keys are ``keys_per_seq`` slots per sequence."""
    assert a.cu_seqlens_q is not None and a.cu_seqlens_k is not None
    batch = a.cu_seqlens_q.shape[0] - 1
    seq_q, pos_q, valid_q = _segments(a.cu_seqlens_q, total_q)
    if keys_per_seq is None:
        seq_k, pos_k, valid_k = _segments(a.cu_seqlens_k, total_k)
    else:
        dev = a.cu_seqlens_q.device
        seq_k = torch.arange(batch, device=dev).repeat_interleave(keys_per_seq)
        pos_k = torch.arange(keys_per_seq, device=dev).repeat(batch)
        valid_k = torch.ones_like(seq_k, dtype=torch.bool)
    len_q = a.cu_seqlens_q.diff().long()
    len_k = (a.seqused_k if a.seqused_k is not None else a.cu_seqlens_k.diff()).long()
    valid_k = valid_k & (pos_k < len_k[seq_k])
    aligned_q = pos_q + (len_k - len_q)[seq_q]
    seq_q = torch.where(valid_q, seq_q, -1)
    return RowIndex(seq_q[None], pos_q[None], aligned_q[None], seq_k[None], pos_k[None], valid_k[None], True)


def _mask(idx: RowIndex, rows: slice, a: AttnArgs) -> Tensor:
    """(B, 1, rows, Sk) bool: True where query row may attend to key."""
    aligned = idx.aligned_q[:, rows, None]
    pos_k = idx.pos_k[:, None, :]
    keep = idx.valid_k[:, None, :].expand(aligned.shape[0], aligned.shape[1], pos_k.shape[-1])
    if idx.same_seq_needed:
        keep = keep & (idx.seq_q[:, rows, None] == idx.seq_k[:, None, :])
    if a.window_left >= 0:
        keep = keep & (pos_k >= aligned - a.window_left)
    if a.window_right >= 0:
        keep = keep & (pos_k <= aligned + a.window_right)
    return keep[:, None]


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for uint32 values held in int64, without int64 overflow."""
    lo = (x * (c & 0xFFFF)) & MASK32
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on uint32 values held in int64 (a bijection that avalanches)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_threshold(dropout_p: float) -> int:
    """Keep an entry when the top 24 bits of its hash are below this (every backend uses it)."""
    return int((1.0 - dropout_p) * 16777216.0)


def dropout_keep(rng_state: Tensor, bh: Tensor, i: Tensor, j: Tensor, dropout_p: float) -> Tensor:
    """The dropout mask every backend draws: keep[b, h, i, j] from a counter-based hash.

    key = fmix32(seed ^ fmix32(offset)); row = fmix32(fmix32(key ^ bh) ^ i); r = fmix32(row ^ j),
    with bh = sequence * nheads_q + head, i and j positions in the sequence. Kept iff
    (r >> 8) < dropout_threshold(p). The Triton kernels implement the same function.
    """
    seed, offset = (rng_state & MASK32).unbind()
    key = fmix32(seed ^ fmix32(offset))
    row = fmix32(fmix32(key ^ (bh & MASK32)) ^ i)
    r = fmix32(row[..., None] ^ j[..., None, :])
    return (r >> 8) < dropout_threshold(dropout_p)


def _scores(q_blk: Tensor, k: Tensor, idx: RowIndex, rows: slice, a: AttnArgs, bias: Optional[Tensor]):
    """Scores of one query block, masked, plus the softcap tanh needed by backward.

    Returns (s, keep, tanh) with s (B, H, rows, Sk) float32 and -inf where masked.
    """
    s = torch.matmul(q_blk, k.transpose(-1, -2)) * a.softmax_scale
    tanh = None
    if a.softcap > 0:
        tanh = torch.tanh(s / a.softcap)
        s = a.softcap * tanh
    if a.alibi_slopes is not None:
        slopes = a.alibi_slopes.float()
        if slopes.dim() == 1:
            slope = slopes[None, :, None, None]
        else:
            slope = slopes[idx.seq_q[:, rows].clamp(min=0)].transpose(1, 2)[..., None]
        dist = (idx.aligned_q[:, rows, None] - idx.pos_k[:, None, :]).abs()[:, None]
        s = s - slope * dist
    if bias is not None:
        s = s + (bias if bias.shape[2] == 1 else bias[:, :, rows]).float()
    keep = _mask(idx, rows, a)
    return s.masked_fill(~keep, float("-inf")), keep, tanh


def _dropout_scale(a: AttnArgs, idx: RowIndex, rows: slice, nheads: int) -> Optional[Tensor]:
    """(B, H, rows, Sk) float32: 0 for dropped entries, 1/(1-p) for kept ones; None without dropout."""
    if a.dropout_p == 0.0:
        return None
    assert a.rng_state is not None
    seq = idx.seq_q[:, rows].clamp(min=0)
    bh = seq[:, None, :] * nheads + torch.arange(nheads, device=seq.device)[None, :, None]
    keep = dropout_keep(a.rng_state, bh, idx.pos_q[:, None, rows], idx.pos_k[:, None, :], a.dropout_p)
    return keep.float() / (1.0 - a.dropout_p)


def _expand_heads(x: Tensor, hq: int) -> Tensor:
    """(B, S, h, d) -> (B, hq, S, d) float32, query head i reading head i // (hq // h)."""
    h = x.shape[2]
    return x.float().repeat_interleave(hq // h, dim=2).transpose(1, 2)


def _reduce_heads(dx: Tensor, h: int) -> Tensor:
    """(B, hq, S, d) -> (B, S, h, d): the sum over the query heads that read each head."""
    b, hq, s, d = dx.shape
    return dx.view(b, h, hq // h, s, d).sum(2).transpose(1, 2)


def _sink_logits(a: AttnArgs) -> Optional[Tensor]:
    return None if a.sinks is None else a.sinks.float()[None, :, None]


def _forward_core(
    q: Tensor, k: Tensor, v: Tensor, idx: RowIndex, a: AttnArgs, bias: Optional[Tensor], want_probs: bool = False
):
    """q (B, Sq, Hq, D), k (B, Sk, Hk, D), v (B, Sk, Hv, Dv) -> out (B, Sq, Hq, Dv) f32,
    lse (B, Hq, Sq), and probs (B, Hq, Sq, Sk) with dropped entries negated if asked."""
    bsz, sq, hq, _ = q.shape
    kx, vx = _expand_heads(k, hq), _expand_heads(v, hq)
    qx = q.float().transpose(1, 2)
    out = q.new_empty((bsz, hq, sq, v.shape[-1]), dtype=torch.float32)
    lse = q.new_empty((bsz, hq, sq), dtype=torch.float32)
    probs = q.new_zeros((bsz, hq, sq, k.shape[1]), dtype=torch.float32) if want_probs else None
    sink = _sink_logits(a)
    for i0 in range(0, sq, Q_BLOCK):
        rows = slice(i0, min(i0 + Q_BLOCK, sq))
        cols = idx.key_range(rows, a, k.shape[1])
        s, _, _ = _scores(qx[:, :, rows], kx[:, :, cols], idx.keys(cols), rows, a, _bias_cols(bias, cols))
        # no key at all (sk = 0): amax refuses an empty dim; the row max is -inf, so out 0 and lse -inf
        m = s.amax(-1) if s.shape[-1] else s.new_full(s.shape[:-1], float("-inf"))
        if sink is not None:
            # padding tokens past the last sequence belong to no head's softmax: no sink, lse -inf
            row_sink = torch.where(idx.seq_q[:, None, rows] >= 0, sink, float("-inf"))
            m = torch.maximum(m, row_sink)
        m = torch.where(torch.isinf(m), 0.0, m)
        e = torch.exp(s - m[..., None])
        denom = e.sum(-1)
        if sink is not None:
            denom = denom + torch.exp(row_sink - m)
        p = e / torch.where(denom > 0, denom, 1.0)[..., None]
        lse[:, :, rows] = m + torch.log(denom)
        scale = _dropout_scale(a, idx.keys(cols), rows, hq)
        p_drop = p if scale is None else p * scale
        out[:, :, rows] = torch.matmul(p_drop, vx[:, :, cols])
        if probs is not None:
            probs[:, :, rows, cols] = p if scale is None else torch.where(scale > 0, p, -p)
    return out.transpose(1, 2), lse, probs


def _backward_core(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    idx: RowIndex,
    a: AttnArgs,
    bias: Optional[Tensor],
    want_dbias: bool,
):
    """Gradients for `_forward_core`'s layout: dq (B, Sq, Hq, D), dk, dv (B, Sk, Hk|Hv, D) float32,
    dbias (B, Hq, Sq, Sk)-broadcast-reduced to bias's shape or None, dsink (Hq,) or None."""
    bsz, sq, hq, _ = q.shape
    kx, vx = _expand_heads(k, hq), _expand_heads(v, hq)
    qx = q.float().transpose(1, 2)
    dox = dout.float().transpose(1, 2)
    lse_safe = torch.where(torch.isneginf(lse), float("inf"), lse)
    dq = torch.empty_like(qx)
    dkx, dvx = torch.zeros_like(kx), torch.zeros_like(vx)
    sink = _sink_logits(a)
    dsink = torch.zeros(hq, device=q.device) if sink is not None else None
    dbias = torch.zeros(bias.shape, device=q.device) if want_dbias and bias is not None else None
    for i0 in range(0, sq, Q_BLOCK):
        rows = slice(i0, min(i0 + Q_BLOCK, sq))
        cols = idx.key_range(rows, a, k.shape[1])
        kb, vb = kx[:, :, cols], vx[:, :, cols]
        s, _, tanh = _scores(qx[:, :, rows], kb, idx.keys(cols), rows, a, _bias_cols(bias, cols))
        p = torch.exp(s - lse_safe[:, :, rows, None])
        scale = _dropout_scale(a, idx.keys(cols), rows, hq)
        do_blk = dox[:, :, rows]
        p_drop = p if scale is None else p * scale
        dvx[:, :, cols] += torch.matmul(p_drop.transpose(-1, -2), do_blk)
        dp = torch.matmul(do_blk, vb.transpose(-1, -2))
        if scale is not None:
            dp = dp * scale
        # rowsum(dO * O) computed from float32 P instead of the saved low-precision O: bf16's rounding
        # of O put dsink (a sum of delta over every row) past 2x the bf16 baseline's error once in
        # ~1500 draws (203x113, d40); the block covers every key a row may see, so the row sum is whole.
        delta = (p * dp).sum(-1)
        ds = p * (dp - delta[..., None])
        if dbias is not None:
            _accumulate_bias_grad(dbias, ds, rows, cols)
        if dsink is not None:
            p_sink = torch.exp(sink - lse_safe[:, :, rows])
            dsink -= (p_sink * delta).sum((0, 2))
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dq[:, :, rows] = torch.matmul(ds, kb) * a.softmax_scale
        dkx[:, :, cols] += torch.matmul(ds.transpose(-1, -2), qx[:, :, rows]) * a.softmax_scale
    return (dq.transpose(1, 2), _reduce_heads(dkx, k.shape[2]), _reduce_heads(dvx, v.shape[2]), dbias, dsink)


def _accumulate_bias_grad(dbias: Tensor, ds: Tensor, rows: slice, cols: slice) -> None:
    """Add one block's dS (B, H, rows, cols) into the 4-d dbias, summed over its broadcast axes."""
    reduce_dims = [d for d in range(4) if dbias.shape[d] == 1 and ds.shape[d] != 1]
    g = ds.sum(reduce_dims, keepdim=True) if reduce_dims else ds
    dbias[:, :, slice(None) if dbias.shape[2] == 1 else rows, slice(None) if dbias.shape[3] == 1 else cols] += g


def _bias_cols(bias: Optional[Tensor], cols: slice) -> Optional[Tensor]:
    return bias if bias is None or bias.shape[3] == 1 else bias[..., cols]


def _bias4(a: AttnArgs) -> Optional[Tensor]:
    """attn_bias as a 4-d (b|1, h|1, sq|1, sk|1) view."""
    if a.attn_bias is None:
        return None
    bias = a.attn_bias
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _varlen_keys(k: Tensor, v: Tensor, a: AttnArgs) -> tuple[Tensor, Tensor, Optional[int]]:
    """Packed or paged k/v as one (1, Sk, h, d) batch row; the slots per sequence when paged."""
    if a.block_table is None:
        return k[None], v[None], None
    pages = a.block_table.long()
    slots = pages.shape[1] * k.shape[1]
    return (k[pages].reshape(1, -1, *k.shape[2:]), v[pages].reshape(1, -1, *v.shape[2:]), slots)


def _index_for(q: Tensor, k: Tensor, a: AttnArgs, keys_per_seq: Optional[int]) -> RowIndex:
    if a.is_varlen:
        return varlen_index(a, q.shape[0], keys_per_seq, k.shape[1])
    return dense_index(q.shape[0], q.shape[1], k.shape[1], q.device)


def fwd(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> tuple[Tensor, Tensor]:
    """The `flexattn::fwd` op on this backend; shapes as in `AttnArgs`."""
    if a.is_varlen:
        kb, vb, per_seq = _varlen_keys(k, v, a)
        idx = _index_for(q, kb, a, per_seq)
        out, lse, _ = _forward_core(q[None], kb, vb, idx, a, None)
        return _as(out[0], q), lse[0]
    out, lse, _ = _forward_core(q, k, v, _index_for(q, k, a, None), a, _bias4(a))
    return _as(out, q), lse


def probs(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> Tensor:
    """The `flexattn::probs` op: (b, hq, sq, sk) softmax probabilities, dropped entries negated."""
    _, _, p = _forward_core(q, k, v, _index_for(q, k, a, None), a, _bias4(a), want_probs=True)
    return p


def bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, a: AttnArgs, want_dbias: bool
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The `flexattn::bwd` op on this backend: dq, dk, dv in the dtypes of q, k, v; dbias in the
    shape of attn_bias (None unless asked); dsink (hq,) or None. `out` is part of the op's contract but
    not read here: the backward recomputes P in float32 and takes rowsum(dO * O) from it."""
    if a.is_varlen:
        kb, vb, per_seq = _varlen_keys(k, v, a)
        idx = _index_for(q, kb, a, per_seq)
        dq, dk, dv, _, dsink = _backward_core(dout[None], q[None], kb, vb, lse[None], idx, a, None, False)
        dq, dk, dv = dq[0], dk[0], dv[0]
        if a.block_table is not None:
            dk, dv = _scatter_pages(dk, k, a.block_table), _scatter_pages(dv, v, a.block_table)
    else:
        bias = _bias4(a)
        dq, dk, dv, dbias4, dsink = _backward_core(dout, q, k, v, lse, _index_for(q, k, a, None), a, bias, want_dbias)
        if dbias4 is not None:
            assert a.attn_bias is not None
            dbias = dbias4.reshape(a.attn_bias.shape).to(a.attn_bias.dtype)
            return as_grad_of(dq, q), as_grad_of(dk, k), as_grad_of(dv, v), dbias, _cast(dsink, a)
    return as_grad_of(dq, q), as_grad_of(dk, k), as_grad_of(dv, v), None, _cast(dsink, a)


def _as(x: Tensor, like: Tensor) -> Tensor:
    """x in like's dtype, contiguous: the layout fwd's fake promises for out."""
    return x.to(like.dtype).contiguous()


def as_grad_of(x: Tensor, like: Tensor) -> Tensor:
    """x as like's gradient: like's dtype and the layout torch.empty_like(like) has, which every backend's
    gradients and bwd's fake have (a permuted-dense input's strides, so autograd accumulates the gradient
    into .grad without a strided copy; contiguous for a sliced input)."""
    return torch.empty_like(like).copy_(x)


def _cast(dsink: Optional[Tensor], a: AttnArgs) -> Optional[Tensor]:
    return None if dsink is None or a.sinks is None else dsink.to(a.sinks.dtype)


def _scatter_pages(d_gathered: Tensor, cache: Tensor, block_table: Tensor) -> Tensor:
    """Sum gradients of gathered page slots (b * max_blocks * page, h, d) back onto the cache."""
    page = cache.shape[1]
    grad = torch.zeros(cache.shape, dtype=torch.float32, device=cache.device)
    grad.index_add_(0, block_table.reshape(-1).long(), d_gathered.reshape(-1, page, *cache.shape[2:]))
    return grad.to(cache.dtype)


# num_splits=0: one split per this many cache slots, at most MAX_SPLITS. Splitting buys the
# reference nothing in speed; the heuristic only decides how often `combine` runs, so long
# caches exercise the same merge a GPU split-KV kernel relies on.
KEYS_PER_SPLIT = 512
MAX_SPLITS = 16


def num_splits_for(num_splits: int, seqlen_k: int) -> int:
    """How many key chunks `fwd_kvcache` merges: `num_splits`, 0 = heuristic, never more than the keys."""
    if num_splits == 0:
        num_splits = min(MAX_SPLITS, -(-seqlen_k // KEYS_PER_SPLIT))
    return max(1, min(num_splits, seqlen_k))


def combine(out_partial: Tensor, lse_partial: Tensor) -> tuple[Tensor, Tensor]:
    """The `flexattn::combine` op: out (..., dv) and lse (...), both float32.

    Splits whose lse is -inf (no key) get weight 0 whatever their out holds; rows where every
    split is -inf give out 0 and lse -inf.
    """
    lse_p = lse_partial.float()
    m = lse_p.amax(0)
    m = torch.where(torch.isinf(m), 0.0, m)
    w = torch.exp(lse_p - m)
    total = w.sum(0)
    lse = m + torch.log(total)
    weighted = torch.where(w[..., None] > 0, w[..., None] * out_partial.float(), 0.0)
    out = weighted.sum(0) / torch.where(total > 0, total, 1.0)[..., None]
    return out.contiguous(), lse.contiguous()


def rotary(x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, interleaved: bool) -> Tensor:
    """Rotate the first rotary_dim dims of x (b, s, h, d) at positions pos (b, s), in float32.

    cos/sin are (seqlen_ro, rotary_dim / 2). Interleaved pairs dims (0, 1), (2, 3), ...;
    GPT-NeoX pairs dim i with i + rotary_dim / 2.
    """
    half = cos.shape[1]
    c = cos.float()[pos][:, :, None]
    s = sin.float()[pos][:, :, None]
    xf = x.float()
    xr, rest = xf[..., : 2 * half], xf[..., 2 * half :]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        xr = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        xr = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((xr, rest), dim=-1)


def _append(cache: Tensor, new: Tensor, rows: Tensor, slots: Tensor, block_table: Optional[Tensor]) -> None:
    """cache[row, slot] = new (b, s_new, h, d) in place, slots (b, s_new) logical positions.

    Indices are computed on device and written with one index_put_, so no value reaches the host.
    """
    if block_table is None:
        cache.index_put_((rows[:, None].expand_as(slots), slots), new.to(cache.dtype))
    else:
        page = cache.shape[1]
        blocks = block_table.long().gather(1, slots // page)
        cache.index_put_((blocks, slots % page), new.to(cache.dtype))


def fwd_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, c: KVCacheArgs) -> tuple[Tensor, Tensor]:
    """The `flexattn::fwd_kvcache` op: appends c.k/c.v to the caches in place, then attends q to
    every valid cache slot. Returns out (b, sq, hq, dv) in q's dtype and lse (b, hq, sq) float32.

    Per sequence the valid slots are [leftpad, cache_seqlens + s_new); logical key positions (for
    masks, ALiBi and rotary) count from leftpad. Everything is masks over the full cache length.
    """
    b, sq = q.shape[:2]
    dev = q.device
    s_new = 0 if c.k is None else c.k.shape[1]
    paged = c.block_table is not None
    cache_len = c.block_table.shape[1] * k_cache.shape[1] if c.block_table is not None else k_cache.shape[1]
    seqlens = torch.full((b,), cache_len, device=dev) if c.cache_seqlens is None else c.cache_seqlens.long()
    leftpad = torch.zeros(b, dtype=torch.long, device=dev) if c.cache_leftpad is None else c.cache_leftpad.long()
    rows = torch.arange(b, device=dev) if c.cache_batch_idx is None else c.cache_batch_idx.long()
    if c.k is not None and c.v is not None:
        k_new = c.k
        start = (seqlens - leftpad)[:, None]
        if c.rotary_cos is not None and c.rotary_sin is not None:
            last = c.rotary_cos.shape[0] - 1
            k_pos = (start + torch.arange(s_new, device=dev)).clamp(0, last)
            # flash-attn: without a causal/local mask every query sits at the first new position.
            local = c.window_left >= 0 or c.window_right >= 0
            q_pos = (start + torch.arange(sq, device=dev) * int(local)).clamp(0, last)
            k_new = rotary(k_new, c.rotary_cos, c.rotary_sin, k_pos, c.rotary_interleaved)
            q = rotary(q, c.rotary_cos, c.rotary_sin, q_pos, c.rotary_interleaved).to(q.dtype)
        slots = seqlens[:, None] + torch.arange(s_new, device=dev)
        _append(k_cache, k_new, rows, slots, c.block_table)
        _append(v_cache, c.v, rows, slots, c.block_table)
    if paged:
        assert c.block_table is not None
        pages = c.block_table.long()
        keys = k_cache[pages].reshape(b, cache_len, *k_cache.shape[2:])
        values = v_cache[pages].reshape(b, cache_len, *v_cache.shape[2:])
    else:
        keys, values = k_cache[rows], v_cache[rows]
    end = seqlens + s_new
    j = torch.arange(cache_len, device=dev)[None, :]
    ar_q = torch.arange(sq, device=dev).expand(b, sq)
    seq = torch.arange(b, device=dev)[:, None]
    idx = RowIndex(
        seq.expand(b, sq),
        ar_q,
        ar_q + (end - leftpad - sq)[:, None],
        seq.expand(b, cache_len),
        j - leftpad[:, None],
        (j >= leftpad[:, None]) & (j < end[:, None]),
        False,
    )
    out, lse = _split_kv_attention(q, keys, values, idx, c.attn_args(), num_splits_for(c.num_splits, cache_len))
    return out.to(q.dtype).contiguous(), lse.contiguous()


def _split_kv_attention(
    q: Tensor, k: Tensor, v: Tensor, idx: RowIndex, a: AttnArgs, splits: int
) -> tuple[Tensor, Tensor]:
    """`_forward_core` over `splits` key chunks merged with `combine` (split-KV decoding).

    Sinks belong to the whole row, not to any chunk, so they are folded into the merged lse once.
    """
    if splits == 1:
        out, lse, _ = _forward_core(q, k, v, idx, a, None)
        return out, lse
    chunk = -(-k.shape[1] // splits)
    no_sinks = a._replace(sinks=None)
    outs, lses = [], []
    for j0 in range(0, k.shape[1], chunk):
        cols = slice(j0, j0 + chunk)
        o, lse_part, _ = _forward_core(q, k[:, cols], v[:, cols], idx.keys(cols), no_sinks, None)
        outs.append(o)
        lses.append(lse_part.transpose(1, 2))  # (B, Sq, Hq) to match o's (B, Sq, Hq, Dv)
    out, lse = combine(torch.stack(outs), torch.stack(lses))
    lse = lse.transpose(1, 2)
    if a.sinks is not None:
        with_sink = torch.logaddexp(lse, a.sinks.float()[None, :, None])
        out = out * torch.exp(lse - with_sink).transpose(1, 2)[..., None]
        lse = with_sink
    return out, lse
