"""Fake (meta) implementations of every `flexattn` op: shapes, dtypes and strides only.

Installed as `flexattn_ops.meta`. Importable with no GPU and no compiled extension. Each fake
validates its inputs with the same checks as the real kernels (so a bad call fails while
tracing) and returns exactly the strides the real kernels return: contiguous outputs, and gradients
in the layout of their inputs (`torch.empty_like`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexattn_ops.params import AttnArgs, KVCacheArgs
from flexattn_ops.validation import check_attention, check_backward, check_combine, check_kvcache


def out_and_lse_shapes(q: Tensor, v: Tensor, a: AttnArgs) -> tuple[tuple, tuple]:
    """Dense: out (b, sq, hq, dv), lse (b, hq, sq). Varlen: out (total_q, hq, dv), lse (hq, total_q)."""
    out_shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    lse_shape = (q.shape[1], q.shape[0]) if a.is_varlen else (q.shape[0], q.shape[2], q.shape[1])
    return out_shape, lse_shape


def fwd_fake(q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    a = AttnArgs(*args)
    check_attention(q, k, v, a)
    out_shape, lse_shape = out_and_lse_shapes(q, v, a)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=torch.float32)


def probs_fake(q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
    a = AttnArgs(*args)
    check_attention(q, k, v, a)
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dtype=torch.float32)


def bwd_fake(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *args):
    *attn, bias_requires_grad = args
    a = AttnArgs(*attn)
    check_attention(q, k, v, a)
    check_backward(dout, q, v, out, lse, a)
    dbias = (
        q.new_empty(a.attn_bias.shape, dtype=a.attn_bias.dtype)
        if bias_requires_grad and a.attn_bias is not None
        else q.new_empty(0)
    )
    dsink = q.new_empty(a.sinks.shape, dtype=a.sinks.dtype) if a.sinks is not None else q.new_empty(0)
    # gradients take their input's layout (torch.empty_like: a permuted-dense input's strides, else contiguous),
    # so autograd accumulates them into .grad without a strided copy
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias, dsink


def fwd_kvcache_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, *args) -> tuple[Tensor, Tensor]:
    """out (b, sq, hq, dv) in q's dtype, lse (b, hq, sq) float32, both contiguous; caches mutate in place."""
    c = KVCacheArgs(*args)
    check_kvcache(q, k_cache, v_cache, c)
    b, sq, hq, _ = q.shape
    return q.new_empty((b, sq, hq, v_cache.shape[-1])), q.new_empty((b, hq, sq), dtype=torch.float32)


def combine_fake(out_partial: Tensor, lse_partial: Tensor) -> tuple[Tensor, Tensor]:
    """out (..., dv) and lse (...), float32 and contiguous."""
    check_combine(out_partial, lse_partial)
    return (
        out_partial.new_empty(out_partial.shape[1:], dtype=torch.float32),
        lse_partial.new_empty(lse_partial.shape[1:], dtype=torch.float32),
    )
