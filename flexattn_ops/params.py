"""The attention arguments every op shares, defined once.

`fwd`, `bwd` and `probs` take ``q, k, v`` (and `bwd` some tensors before them) followed by the
same attention arguments. The schema string and the `AttnArgs` tuple below are the single
definition of those arguments; `ops.py` builds each op's schema from `ATTN_SCHEMA`, and every
backend, fake and validator reads them through `AttnArgs`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

ATTN_SCHEMA = (
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, Tensor? block_table, "
    "SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, int window_left, "
    "int window_right, float softcap, Tensor? alibi_slopes, Tensor? attn_bias, Tensor? sinks, "
    "float dropout_p, Tensor? rng_state, bool deterministic"
)


class AttnArgs(NamedTuple):
    """Everything but the tensors attended over. Field order is the schema's order.

    Dense inputs: ``q (b, sq, hq, dqk)``, ``k (b, sk, hk, dqk)``, ``v (b, sk, hv, dv)``.
    Varlen inputs (``cu_seqlens_q`` given): ``q (total_q, hq, dqk)``, ``k/v (total_k, h, d)``, or,
    with ``block_table (b, max_blocks)``, paged ``k/v (num_blocks, page_size, h, d)``.
    ``window_right == 0`` with ``window_left == -1`` is causal; -1 means unbounded.
    ``rng_state`` is an int64 ``(2,)`` tensor ``[seed, offset]`` when ``dropout_p > 0``.
    """

    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    seqused_k: Optional[Tensor] = None
    block_table: Optional[Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    softmax_scale: float = 1.0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[Tensor] = None
    attn_bias: Optional[Tensor] = None
    sinks: Optional[Tensor] = None
    dropout_p: float = 0.0
    rng_state: Optional[Tensor] = None
    deterministic: bool = False

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def is_causal(self) -> bool:
        return self.window_left < 0 and self.window_right == 0


# `fwd_kvcache` takes ``q, k_cache, v_cache`` (the caches mutated in place) followed by these.
KVCACHE_SCHEMA = (
    "Tensor? k, Tensor? v, Tensor? rotary_cos, Tensor? rotary_sin, Tensor? cache_seqlens, "
    "Tensor? cache_batch_idx, Tensor? cache_leftpad, Tensor? block_table, float softmax_scale, int window_left, "
    "int window_right, float softcap, bool rotary_interleaved, Tensor? alibi_slopes, Tensor? sinks, int num_splits"
)


class KVCacheArgs(NamedTuple):
    """The arguments of `fwd_kvcache` after ``q (b, sq, hq, dqk)``, ``k_cache`` and ``v_cache``.

    Caches: ``(b_cache, seqlen_cache, hk|hv, dqk|dv)``, or with ``block_table (b, max_blocks)``
    paged ``(num_blocks, page_size, hk|hv, dqk|dv)`` (any page size). ``k/v (b, s_new, hk|hv, d)``
    are appended at ``cache_seqlens (b,) int32`` (None: the caches are full and nothing is
    appended). ``rotary_cos/sin (seqlen_ro, rotary_dim / 2)``; ``cache_batch_idx`` and
    ``cache_leftpad`` are ``(b,) int32``. ``num_splits`` 0 picks the number of key splits.
    """

    k: Optional[Tensor] = None
    v: Optional[Tensor] = None
    rotary_cos: Optional[Tensor] = None
    rotary_sin: Optional[Tensor] = None
    cache_seqlens: Optional[Tensor] = None
    cache_batch_idx: Optional[Tensor] = None
    cache_leftpad: Optional[Tensor] = None
    block_table: Optional[Tensor] = None
    softmax_scale: float = 1.0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    rotary_interleaved: bool = True
    alibi_slopes: Optional[Tensor] = None
    sinks: Optional[Tensor] = None
    num_splits: int = 0

    def attn_args(self) -> AttnArgs:
        """The attention arguments this call shares with `fwd` (dense layout, no dropout)."""
        return AttnArgs(
            softmax_scale=self.softmax_scale,
            window_left=self.window_left,
            window_right=self.window_right,
            softcap=self.softcap,
            alibi_slopes=self.alibi_slopes,
            sinks=self.sinks,
        )
