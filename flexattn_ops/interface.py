"""The public API: flash-attn 2.8's functions (same names, argument order, defaults, returns),
plus the extensions of SPEC section 2 as keyword-only arguments.

Each function turns its arguments into an `AttnArgs`, makes q/k/v last-dim contiguous and calls
`ops.attention_fwd`: `torch.ops.flexattn.fwd` (whose autograd calls `torch.ops.flexattn.bwd`), or in
unobserved eager code the same implementations without the dispatcher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from flexattn_ops import dispatch, ops
from flexattn_ops.params import AttnArgs, KVCacheArgs

AttnOutput = Union[Tensor, tuple[Tensor, Tensor, Optional[Tensor]]]


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _attn_args(
    q: Tensor,
    dropout_p: float,
    softmax_scale: Optional[float],
    causal: bool,
    window_size: Sequence[int],
    softcap: float,
    alibi_slopes: Optional[Tensor],
    deterministic: bool,
    attn_bias: Optional[Tensor],
    sinks: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    seqused_k: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
) -> AttnArgs:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size: expected a pair (left, right) of ints, got {window_size!r}")
    window_left, window_right = int(window_size[0]), int(window_size[1])
    if causal:
        window_right = 0
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    rng_state = None
    if dropout_p > 0.0:
        rng_state = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=q.device)
    return AttnArgs(
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_k,
        block_table,
        max_seqlen_q,
        max_seqlen_k,
        float(softmax_scale),
        window_left,
        window_right,
        float(softcap),
        alibi_slopes,
        attn_bias,
        sinks,
        float(dropout_p),
        rng_state,
        bool(deterministic),
    )


def _attention(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs, return_attn_probs: bool) -> AttnOutput:
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out, lse = ops.attention_fwd(q, k, v, a)
    if not return_attn_probs:
        return out
    if a.is_varlen:
        # flash-attn's varlen functions return S_dmask = None unless dropout is on; callers (ring
        # attention among them) use return_attn_probs=True just to get softmax_lse (hq, total_q).
        if a.dropout_p > 0.0:
            raise NotImplementedError("return_attn_probs with dropout_p > 0: only dense (not varlen) inputs")
        return out, lse, None
    with torch.no_grad():  # like flash-attn's S_dmask, the probabilities carry no gradient
        probs = torch.ops.flexattn.probs(q, k, v, *a)
    return out, lse, probs


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    attn_bias: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> AttnOutput:
    """Attention over dense batches, or jagged nested ones (then the varlen path).

    Args:
        q: (batch, seqlen_q, nheads, headdim_qk); or q, k, v all jagged nested tensors
            (layout=torch.jagged, ragged in dim 1), giving a nested out with q's offsets.
        k: (batch, seqlen_k, nheads_k, headdim_qk); nheads % nheads_k == 0.
        v: (batch, seqlen_k, nheads_v, headdim_v); nheads % nheads_v == 0 (may differ from nheads_k).
        dropout_p: dropout probability (pass 0.0 in evaluation).
        softmax_scale: defaults to 1 / sqrt(headdim_qk).
        causal: bottom-right aligned causal mask.
        window_size: (left, right) sliding window, -1 = unbounded.
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        alibi_slopes: (nheads,) or (batch, nheads) float32; adds -slope * |i + sk - sq - j|.
        deterministic: bitwise-reproducible backward.
        return_attn_probs: also return softmax_lse and the probabilities (testing only).
        attn_bias: additive bias broadcastable to (batch, nheads, seqlen_q, seqlen_k); differentiable.
        sinks: (nheads,) learnable per-head logits added to each softmax denominator; differentiable.

    Returns:
        out (batch, seqlen_q, nheads, headdim_v); with return_attn_probs also softmax_lse
        (batch, nheads, seqlen_q) float32 and probs (batch, nheads, seqlen_q, seqlen_k), dropped
        entries negated.
    """
    if q.is_nested or k.is_nested or v.is_nested:
        return _nested_attention(
            q,
            k,
            v,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            deterministic,
            return_attn_probs,
            attn_bias,
            sinks,
        )
    a = _attn_args(
        q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, attn_bias, sinks
    )
    return _attention(q, k, v, a, return_attn_probs)


def _nested_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float,
    softmax_scale: Optional[float],
    causal: bool,
    window_size: Sequence[int],
    softcap: float,
    alibi_slopes: Optional[Tensor],
    deterministic: bool,
    return_attn_probs: bool,
    attn_bias: Optional[Tensor],
    sinks: Optional[Tensor],
) -> Tensor:
    """`flash_attn_func` on jagged nested q (batch, seqlen_q*, nheads, d), k/v (batch, seqlen_k*, h, d):
    the varlen path on their packed values, the output nested with q's offsets (so autograd flows
    back through `values()` to the nested inputs)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not (t.is_nested and t.layout == torch.jagged):
            got = f"a nested tensor with layout {t.layout}" if t.is_nested else "a dense tensor"
            raise TypeError(f"{name}: expected a jagged nested tensor (layout=torch.jagged) like the others, got {got}")
        ragged = getattr(t, "_ragged_idx", 1)
        if t.dim() != 4 or ragged != 1:
            raise ValueError(
                f"{name}: expected a jagged (batch, seqlen*, nheads, headdim) tensor ragged in dim 1, "
                f"got {t.dim()} dims ragged in dim {ragged}"
            )
        if getattr(t, "_lengths", None) is not None:
            raise ValueError(f"{name}: expected a contiguous jagged tensor (offsets only), got one with holes")
    if k.size(0) != q.size(0) or v.size(0) != q.size(0):
        raise ValueError(f"k/v: expected batch size {q.size(0)} (that of q), got {k.size(0)} and {v.size(0)}")
    # v's lengths cannot be compared with k's without reading offsets on the host; the totals can.
    if v.values().shape[0] != k.values().shape[0]:
        raise ValueError(
            f"v: expected the sequence lengths of k (total {k.values().shape[0]}), got total {v.values().shape[0]}"
        )
    if attn_bias is not None:
        raise ValueError("attn_bias: expected None with nested inputs (varlen path), got a tensor")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs: only dense (not nested) inputs are supported")
    out = flash_attn_varlen_func(
        q.values(),
        k.values(),
        v.values(),
        q.offsets().to(torch.int32),
        k.offsets().to(torch.int32),
        q._get_max_seqlen(),
        k._get_max_seqlen(),
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        sinks=sinks,
    )
    assert isinstance(out, Tensor)
    return torch.nested.nested_tensor_from_jagged(out, q.offsets(), max_seqlen=q._get_max_seqlen())


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    attn_bias: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> AttnOutput:
    """`flash_attn_func` with qkv packed as (batch, seqlen, 3, nheads, headdim)."""
    _check_packed("qkv", qkv, 5, 3)
    q, k, v = qkv.unbind(dim=2)
    return flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        attn_bias=attn_bias,
        sinks=sinks,
    )


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    attn_bias: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> AttnOutput:
    """`flash_attn_func` with q (batch, seqlen_q, nheads, headdim) and kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    _check_packed("kv", kv, 5, 2)
    k, v = kv.unbind(dim=2)
    return flash_attn_func(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        attn_bias=attn_bias,
        sinks=sinks,
    )


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[Tensor] = None,
    *,
    seqused_k: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> AttnOutput:
    """Attention over packed variable-length sequences.

    Args:
        q: (total_q, nheads, headdim_qk), sequences back to back.
        k, v: (total_k, nheads_k|nheads_v, headdim), or with `block_table` paged
            (num_blocks, page_size, nheads_k|nheads_v, headdim) with any page size.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 cumulative lengths starting at 0.
        max_seqlen_q, max_seqlen_k: Python ints, the longest sequence lengths.
        block_table: (batch, max_blocks) int32 page indices of each sequence's keys.
        seqused_k: (batch,) int32, the number of keys each sequence uses (<= its length).
        Other arguments as `flash_attn_func`; causal and windows are per sequence, bottom-right.

    Returns:
        out (total_q, nheads, headdim_v); with return_attn_probs (out, softmax_lse (nheads, total_q)
        float32, None) as flash-attn without dropout (probabilities are not returned for varlen).
    """
    a = _attn_args(
        q,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        None,
        sinks,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        seqused_k,
        block_table,
    )
    return _attention(q, k, v, a, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnOutput:
    """`flash_attn_varlen_func` with qkv packed as (total, 3, nheads, headdim)."""
    _check_packed("qkv", qkv, 4, 3)
    q, k, v = qkv.unbind(dim=1)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnOutput:
    """`flash_attn_varlen_func` with kv packed as (total_k, 2, nheads_k, headdim)."""
    _check_packed("kv", kv, 4, 2)
    k, v = kv.unbind(dim=1)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
    )


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens: Optional[Union[int, Tensor]] = None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention against a KV cache, appending new keys/values to it in place (decoding). No backward.

    Args:
        q: (batch, seqlen_q, nheads, headdim_qk).
        k_cache: (batch_cache, seqlen_cache, nheads_k, headdim_qk), or with `block_table` a paged
            cache (num_blocks, page_size, nheads_k, headdim_qk) with any page size. Updated in place.
        v_cache: like k_cache with nheads_v, headdim_v. Updated in place.
        k, v: optional new (batch, seqlen_new, nheads_k|nheads_v, headdim) written at
            cache positions cache_seqlens, cache_seqlens + 1, ... of each sequence, then attended to.
        rotary_cos, rotary_sin: optional (seqlen_ro >= cache length, rotary_dim / 2),
            rotary_dim <= headdim_qk; rotate the new k at positions cache_seqlens - cache_leftpad + i,
            and q at the same positions if causal/local, else all of q at the first of them.
        cache_seqlens: int or (batch,) int32, the cache slots in use per sequence (None: all).
        cache_batch_idx: (batch,) int32, the cache row of each sequence (dense caches only).
        cache_leftpad: (batch,) int32, the first valid cache slot of each sequence.
        block_table: (batch, max_blocks) int32 page indices of each sequence.
        rotary_interleaved: rotate dims (0, 1), (2, 3), ... if True, else (i, i + rotary_dim / 2).
        num_splits: split the keys into this many chunks merged with `combine`; 0 = heuristic.
        return_softmax_lse: also return softmax_lse.
        sinks: (nheads,) per-head logits added to each softmax denominator (extension).
        Other arguments as `flash_attn_func`; causal and windows are bottom-right aligned on the
        valid keys (the cache after the append).

    Returns:
        out (batch, seqlen_q, nheads, headdim_v); with return_softmax_lse also softmax_lse
        (batch, nheads, seqlen_q) float32 (including the sink when given).
    """
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size: expected a pair (left, right) of ints, got {window_size!r}")
    window_left, window_right = int(window_size[0]), int(window_size[1])
    if causal:
        window_right = 0
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    c = KVCacheArgs(
        None if k is None else _last_dim_contiguous(k),
        None if v is None else _last_dim_contiguous(v),
        rotary_cos,
        rotary_sin,
        cache_seqlens,
        cache_batch_idx,
        cache_leftpad,
        block_table,
        float(softmax_scale),
        window_left,
        window_right,
        float(softcap),
        bool(rotary_interleaved),
        alibi_slopes,
        sinks,
        int(num_splits),
    )
    # The caches are not copied: the op writes into exactly the tensors the caller passed.
    out, lse = torch.ops.flexattn.fwd_kvcache(_last_dim_contiguous(q), k_cache, v_cache, *c)
    return (out, lse) if return_softmax_lse else out


def _check_packed(name: str, t: Tensor, rank: int, count: int) -> None:
    axis = rank - 3
    if t.dim() != rank or t.shape[axis] != count:
        raise ValueError(f"{name}: expected a {rank}-d tensor with {count} at dim {axis}, got shape {tuple(t.shape)}")


def explain_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    *,
    attn_bias: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    op: str = "fwd",
) -> dispatch.BackendChoice:
    """Which backend `flash_attn_func` (op "fwd", or "bwd" for its backward) would use for these
    inputs under the current FLEXATTN_BACKEND, and why each other backend would not."""
    a = _attn_args(
        q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, attn_bias, sinks
    )
    return dispatch.explain(op, q, k, v, a)
