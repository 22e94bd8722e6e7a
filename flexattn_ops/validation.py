"""The one place that checks inputs (SPEC section 6).

Every check runs on shapes, dtypes and devices only, never on tensor values, so it runs
unchanged inside the ops' fakes (under `torch.compile` / `torch.export`) and costs no host
synchronisation. Each error names the argument, what was expected and what was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from flexattn_ops.params import AttnArgs, KVCacheArgs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(name: str, expected: str, got: object, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{name}: expected {expected}, got {got}")


def check_dtype(name: str, t: Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        _fail(name, "dtype in " + ", ".join(str(d) for d in allowed), t.dtype, TypeError)


def check_rank(name: str, t: Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        _fail(name, f"a {rank}-d tensor {layout}", f"shape {tuple(t.shape)}")


def check_same_device(ref: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            _fail(name, f"a tensor on {ref.device} (the device of q)", t.device)


def check_window(window_left: int, window_right: int) -> None:
    for i, w in enumerate((window_left, window_right)):
        if w < -1:
            _fail(f"window_size[{i}]", "an int >= -1 (-1 = unbounded)", w)


def check_index_tensor(name: str, t: Tensor, rank: int, what: str) -> None:
    if t.dtype != torch.int32:
        _fail(name, f"an int32 tensor ({what})", t.dtype, TypeError)
    if t.dim() != rank:
        _fail(name, f"a {rank}-d tensor ({what})", f"shape {tuple(t.shape)}")


def check_heads(hq: int, hk: int, hv: int) -> None:
    if hk <= 0 or hq % hk != 0:
        _fail("k", f"a number of heads dividing the {hq} heads of q", hk)
    if hv <= 0 or hq % hv != 0:
        _fail("v", f"a number of heads dividing the {hq} heads of q", hv)


def check_attention(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> None:
    """Validate the inputs of `fwd` / `bwd` / `probs` (see `AttnArgs` for the shapes)."""
    check_dtype("q", q, FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(name, f"the dtype of q ({q.dtype})", t.dtype, TypeError)
    check_same_device(
        q,
        k=k,
        v=v,
        cu_seqlens_q=a.cu_seqlens_q,
        cu_seqlens_k=a.cu_seqlens_k,
        seqused_k=a.seqused_k,
        block_table=a.block_table,
        alibi_slopes=a.alibi_slopes,
        attn_bias=a.attn_bias,
        sinks=a.sinks,
        rng_state=a.rng_state,
    )
    paged = a.block_table is not None
    if a.is_varlen:
        check_rank("q", q, 3, "(total_q, nheads, headdim) for varlen")
        kv_rank, kv_layout = (
            (4, "(num_blocks, page_size, nheads, headdim) for a paged cache")
            if paged
            else (3, "(total_k, nheads, headdim) for varlen")
        )
        check_rank("k", k, kv_rank, kv_layout)
        check_rank("v", v, kv_rank, kv_layout)
        check_varlen(q, k, a)
    else:
        check_rank("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
        check_rank("k", k, 4, "(batch, seqlen_k, nheads_k, headdim)")
        check_rank("v", v, 4, "(batch, seqlen_k, nheads_v, headdim_v)")
        for name in ("cu_seqlens_k", "seqused_k", "block_table"):
            if getattr(a, name) is not None:
                _fail(name, "None unless cu_seqlens_q is given (varlen)", "a tensor")
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            _fail("k/v", f"batch size {q.shape[0]} (that of q)", f"{k.shape[0]} and {v.shape[0]}")
    if k.shape[:-2] != v.shape[:-2]:
        _fail("v", f"the leading shape of k {tuple(k.shape[:-2])}", tuple(v.shape[:-2]))
    if k.shape[-1] != q.shape[-1]:
        _fail("k", f"head dim {q.shape[-1]} (that of q)", k.shape[-1])
    for name, t in (("q", q), ("v", v)):
        if t.shape[-1] < 1:
            _fail(name, "a head dim >= 1", t.shape[-1])
    check_heads(q.shape[-2], k.shape[-2], v.shape[-2])
    check_window(a.window_left, a.window_right)
    if not a.softcap >= 0.0:
        _fail("softcap", "a float >= 0", a.softcap)
    if not 0.0 <= a.dropout_p < 1.0:
        _fail("dropout_p", "a float in [0, 1)", a.dropout_p)
    if a.dropout_p > 0.0:
        if a.rng_state is None:
            _fail("rng_state", "an int64 (2,) tensor [seed, offset] when dropout_p > 0", None)
        elif a.rng_state.dtype != torch.int64 or tuple(a.rng_state.shape) != (2,):
            _fail("rng_state", "an int64 tensor of shape (2,)", f"{a.rng_state.dtype} {tuple(a.rng_state.shape)}")
    batch = a.cu_seqlens_q.shape[0] - 1 if a.is_varlen else q.shape[0]
    hq = q.shape[-2]
    if a.alibi_slopes is not None:
        check_dtype("alibi_slopes", a.alibi_slopes, (torch.float32,))
        if tuple(a.alibi_slopes.shape) not in ((hq,), (batch, hq)):
            _fail("alibi_slopes", f"shape ({hq},) or ({batch}, {hq})", tuple(a.alibi_slopes.shape))
    if a.sinks is not None:
        check_dtype("sinks", a.sinks, FLOAT_DTYPES)
        if tuple(a.sinks.shape) != (hq,):
            _fail("sinks", f"shape ({hq},) (one logit per query head)", tuple(a.sinks.shape))
    if a.attn_bias is not None:
        if a.is_varlen:
            _fail("attn_bias", "None with varlen inputs (pad to dense to use a bias)", "a tensor")
        check_dtype("attn_bias", a.attn_bias, FLOAT_DTYPES)
        check_bias_broadcast(a.attn_bias, (q.shape[0], hq, q.shape[1], k.shape[1]))


def check_bias_broadcast(bias: Tensor, target: tuple[int, int, int, int]) -> None:
    expected = "a tensor broadcastable to (batch, nheads, seqlen_q, seqlen_k) = " + str(tuple(target))
    if bias.dim() > 4:
        _fail("attn_bias", expected, f"shape {tuple(bias.shape)}")
    for size, full in zip(reversed(bias.shape), reversed(target), strict=False):
        if size != 1 and size != full:
            _fail("attn_bias", expected, f"shape {tuple(bias.shape)}")


def check_varlen(q: Tensor, k: Tensor, a: AttnArgs) -> None:
    assert a.cu_seqlens_q is not None
    check_index_tensor("cu_seqlens_q", a.cu_seqlens_q, 1, "(batch + 1,) cumulative query lengths")
    if a.cu_seqlens_k is None:
        _fail("cu_seqlens_k", "an int32 (batch + 1,) tensor with cu_seqlens_q", None)
    check_index_tensor("cu_seqlens_k", a.cu_seqlens_k, 1, "(batch + 1,) cumulative key lengths")
    if a.cu_seqlens_q.shape[0] < 2 or a.cu_seqlens_k.shape != a.cu_seqlens_q.shape:
        _fail(
            "cu_seqlens_k",
            f"shape {tuple(a.cu_seqlens_q.shape)} (that of cu_seqlens_q, >= 2)",
            tuple(a.cu_seqlens_k.shape),
        )
    batch = a.cu_seqlens_q.shape[0] - 1
    if a.seqused_k is not None:
        check_index_tensor("seqused_k", a.seqused_k, 1, "(batch,) key lengths used")
        if a.seqused_k.shape[0] != batch:
            _fail("seqused_k", f"shape ({batch},)", tuple(a.seqused_k.shape))
    if a.block_table is not None:
        check_index_tensor("block_table", a.block_table, 2, "(batch, max_blocks) page indices")
        if a.block_table.shape[0] != batch:
            _fail("block_table", f"{batch} rows (one per sequence)", a.block_table.shape[0])
    if a.max_seqlen_q < 0 or a.max_seqlen_k < 0:
        _fail("max_seqlen_q/max_seqlen_k", "ints >= 0", (a.max_seqlen_q, a.max_seqlen_k))


def check_backward(dout: Tensor, q: Tensor, v: Tensor, out: Tensor, lse: Tensor, a: AttnArgs) -> None:
    """Validate the tensors `bwd` adds to the forward's inputs."""
    expected_out = tuple(q.shape[:-2]) + (q.shape[-2], v.shape[-1])
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != expected_out:
            _fail(name, f"shape {expected_out}", tuple(t.shape))
    expected_lse = (q.shape[1], q.shape[0]) if a.is_varlen else (q.shape[0], q.shape[2], q.shape[1])
    if tuple(lse.shape) != expected_lse:
        _fail("softmax_lse", f"shape {expected_lse}", tuple(lse.shape))
    check_dtype("softmax_lse", lse, (torch.float32,))
    check_same_device(q, dout=dout, out=out, softmax_lse=lse)


def check_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, c: KVCacheArgs) -> None:
    """Validate the inputs of `fwd_kvcache` (see `KVCacheArgs` for the shapes)."""
    check_dtype("q", q, FLOAT_DTYPES)
    check_rank("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    paged = c.block_table is not None
    layout = (
        "(num_blocks, page_size, nheads_k, headdim) with block_table"
        if paged
        else "(batch_cache, seqlen_cache, nheads_k, headdim)"
    )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            _fail(name, f"the dtype of q ({q.dtype})", t.dtype, TypeError)
        check_rank(name, t, 4, layout)
        # The caches are written in place, so the wrapper cannot copy them to a friendlier layout.
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            _fail(name, "a cache with a contiguous last dimension (stride 1)", f"strides {tuple(t.stride())}")
    check_same_device(
        q,
        k_cache=k_cache,
        v_cache=v_cache,
        k=c.k,
        v=c.v,
        rotary_cos=c.rotary_cos,
        rotary_sin=c.rotary_sin,
        cache_seqlens=c.cache_seqlens,
        cache_batch_idx=c.cache_batch_idx,
        cache_leftpad=c.cache_leftpad,
        block_table=c.block_table,
        alibi_slopes=c.alibi_slopes,
        sinks=c.sinks,
    )
    batch, _, hq, dqk = q.shape
    if k_cache.shape[:2] != v_cache.shape[:2]:
        _fail("v_cache", f"the leading shape of k_cache {tuple(k_cache.shape[:2])}", tuple(v_cache.shape[:2]))
    if k_cache.shape[-1] != dqk:
        _fail("k_cache", f"head dim {dqk} (that of q)", k_cache.shape[-1])
    if v_cache.shape[-1] < 1:
        _fail("v_cache", "a head dim >= 1", v_cache.shape[-1])
    check_heads(hq, k_cache.shape[2], v_cache.shape[2])
    if paged:
        assert c.block_table is not None
        check_index_tensor("block_table", c.block_table, 2, "(batch, max_blocks) page indices")
        if c.block_table.shape[0] != batch:
            _fail("block_table", f"{batch} rows (the batch size of q)", c.block_table.shape[0])
        if c.cache_batch_idx is not None:
            _fail(
                "cache_batch_idx", "None with a paged cache (block_table already maps sequences to pages)", "a tensor"
            )
        cache_len = c.block_table.shape[1] * k_cache.shape[1]
    else:
        # Like flash-attn, a larger cache is fine: sequence i uses row i (or cache_batch_idx[i]).
        if c.cache_batch_idx is None and k_cache.shape[0] < batch:
            _fail(
                "k_cache",
                f"at least {batch} rows (the batch size of q; or pass cache_batch_idx)",
                k_cache.shape[0],
            )
        cache_len = k_cache.shape[1]
    for name in ("cache_seqlens", "cache_batch_idx", "cache_leftpad"):
        t = getattr(c, name)
        if t is not None:
            check_index_tensor(name, t, 1, "(batch,)")
            if t.shape[0] != batch:
                _fail(name, f"shape ({batch},) (one entry per sequence of q)", tuple(t.shape))
    if (c.k is None) != (c.v is None):
        _fail("k/v", "both new k and v, or neither", f"k={_given(c.k)}, v={_given(c.v)}")
    if c.k is not None and c.v is not None:
        if c.cache_seqlens is None:
            _fail("cache_seqlens", "an int or (batch,) int32 tensor when k/v are appended", None)
        for name, t, cache in (("k", c.k, k_cache), ("v", c.v, v_cache)):
            if t.dtype != q.dtype:
                _fail(name, f"the dtype of q ({q.dtype})", t.dtype, TypeError)
            check_rank(name, t, 4, "(batch, seqlen_new, nheads_k, headdim)")
            expected = (batch, c.k.shape[1], cache.shape[2], cache.shape[3])
            if tuple(t.shape) != expected:
                _fail(name, f"shape {expected} (batch of q, heads and head dim of {name}_cache)", tuple(t.shape))
        if c.k.shape[1] > cache_len:
            _fail("k", f"at most {cache_len} new keys (the cache length)", c.k.shape[1])
    check_rotary(c, dqk, cache_len, q.dtype)
    check_window(c.window_left, c.window_right)
    if not c.softcap >= 0.0:
        _fail("softcap", "a float >= 0", c.softcap)
    if c.num_splits < 0:
        _fail("num_splits", "an int >= 0 (0 = heuristic)", c.num_splits)
    if c.alibi_slopes is not None:
        check_dtype("alibi_slopes", c.alibi_slopes, (torch.float32,))
        if tuple(c.alibi_slopes.shape) not in ((hq,), (batch, hq)):
            _fail("alibi_slopes", f"shape ({hq},) or ({batch}, {hq})", tuple(c.alibi_slopes.shape))
    if c.sinks is not None:
        check_dtype("sinks", c.sinks, FLOAT_DTYPES)
        if tuple(c.sinks.shape) != (hq,):
            _fail("sinks", f"shape ({hq},) (one logit per query head)", tuple(c.sinks.shape))


def check_rotary(c: KVCacheArgs, headdim: int, cache_len: int, dtype: torch.dtype) -> None:
    """rotary_cos/sin: (seqlen_ro >= cache length, rotary_dim / 2) in q's dtype, rotary_dim <= headdim."""
    cos, sin = c.rotary_cos, c.rotary_sin
    if cos is None and sin is None:
        return
    if cos is None or sin is None:
        _fail("rotary_cos/rotary_sin", "both or neither", f"rotary_cos={_given(cos)}, rotary_sin={_given(sin)}")
    assert cos is not None and sin is not None
    if c.k is None:
        _fail("k/v", "new k and v when rotary_cos/rotary_sin are given (rotary applies to appended keys)", None)
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if t.dtype != dtype:
            _fail(name, f"the dtype of q ({dtype})", t.dtype, TypeError)
        check_rank(name, t, 2, "(seqlen_ro, rotary_dim / 2)")
    if sin.shape != cos.shape:
        _fail("rotary_sin", f"the shape of rotary_cos {tuple(cos.shape)}", tuple(sin.shape))
    if not 1 <= 2 * cos.shape[1] <= headdim:
        _fail("rotary_cos", f"rotary_dim / 2 columns with 2 <= rotary_dim <= headdim {headdim}", tuple(cos.shape))
    if cos.shape[0] < cache_len:
        _fail("rotary_cos", f"at least {cache_len} rows (the cache length; positions index them)", cos.shape[0])


def check_combine(out_partial: Tensor, lse_partial: Tensor) -> None:
    """out_partial (num_splits, ..., dv) float, lse_partial (num_splits, ...) float32."""
    check_dtype("out_partial", out_partial, FLOAT_DTYPES)
    check_dtype("lse_partial", lse_partial, (torch.float32,))
    if out_partial.dim() < 2:
        _fail("out_partial", "a tensor (num_splits, ..., headdim) of rank >= 2", f"shape {tuple(out_partial.shape)}")
    if out_partial.shape[0] < 1:
        _fail("out_partial", "at least one split", f"shape {tuple(out_partial.shape)}")
    if lse_partial.shape != out_partial.shape[:-1]:
        _fail(
            "lse_partial",
            f"shape {tuple(out_partial.shape[:-1])} (out_partial's without headdim)",
            tuple(lse_partial.shape),
        )
    check_same_device(out_partial, lse_partial=lse_partial)


def _given(t: Optional[Tensor]) -> str:
    return "None" if t is None else "a tensor"
