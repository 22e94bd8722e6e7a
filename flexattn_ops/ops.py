"""The `torch.ops.flexattn.*` operators: schemas, real implementations, fakes, autograd.

Each real implementation validates, asks `dispatch` for a backend and calls it; each fake comes
from `flexattn_ops.meta`. Compiled and exported graphs contain these ops, so their schemas are
the stable contract (see `params.ATTN_SCHEMA` for the shared attention arguments).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from flexattn_ops import dispatch
from flexattn_ops.meta import bwd_fake, fwd_fake, probs_fake
from flexattn_ops.params import ATTN_SCHEMA, AttnArgs
from flexattn_ops.validation import check_attention, check_backward

_TENSOR_FIELDS = [
    i
    for i, f in enumerate(AttnArgs._fields)
    if f
    in ("cu_seqlens_q", "cu_seqlens_k", "seqused_k", "block_table", "alibi_slopes", "attn_bias", "sinks", "rng_state")
]
_BIAS = AttnArgs._fields.index("attn_bias")
_SINKS = AttnArgs._fields.index("sinks")


@custom_op(
    "flexattn::fwd", mutates_args=(), schema=f"(Tensor q, Tensor k, Tensor v, {ATTN_SCHEMA}) -> (Tensor, Tensor)"
)
def fwd(q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    """Attention forward: returns (out, softmax_lse). Shapes in `AttnArgs`."""
    a = AttnArgs(*args)
    check_attention(q, k, v, a)
    return dispatch.select("fwd", q, k, v, a).fwd(q, k, v, a)


@custom_op(
    "flexattn::bwd",
    mutates_args=(),
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, {ATTN_SCHEMA}, "
    "bool bias_requires_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *args):
    """Attention backward from any (out, softmax_lse): returns (dq, dk, dv, dbias, dsink).

    dbias has attn_bias's shape when `bias_requires_grad`, dsink the shape of sinks when given;
    otherwise each is an empty (0,) tensor.
    """
    *attn, bias_requires_grad = args
    a = AttnArgs(*attn)
    check_attention(q, k, v, a)
    check_backward(dout, q, v, out, lse, a)
    dq, dk, dv, dbias, dsink = dispatch.select("bwd", q, k, v, a).bwd(dout, q, k, v, out, lse, a, bias_requires_grad)
    empty = q.new_empty(0)
    return dq, dk, dv, empty if dbias is None else dbias, empty if dsink is None else dsink


@custom_op("flexattn::probs", mutates_args=(), schema=f"(Tensor q, Tensor k, Tensor v, {ATTN_SCHEMA}) -> Tensor")
def probs(q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
    """Softmax probabilities (b, hq, sq, sk) float32, entries dropped by dropout negated (testing aid)."""
    a = AttnArgs(*args)
    check_attention(q, k, v, a)
    if a.is_varlen:
        raise NotImplementedError("return_attn_probs: only dense (not varlen) inputs are supported")
    return dispatch.select("probs", q, k, v, a).probs(q, k, v, a)


fwd.register_fake(fwd_fake)
bwd.register_fake(bwd_fake)
probs.register_fake(probs_fake)


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, *args = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.attn = [None if i in _TENSOR_FIELDS else x for i, x in enumerate(args)]
    ctx.save_for_backward(q, k, v, out, lse, *(args[i] for i in _TENSOR_FIELDS))


def _fwd_backward(ctx, dout: Tensor, _dlse: Tensor):
    q, k, v, out, lse, *tensor_args = ctx.saved_tensors
    args = list(ctx.attn)
    for i, t in zip(_TENSOR_FIELDS, tensor_args, strict=True):
        args[i] = t
    bias_requires_grad = ctx.needs_input_grad[3 + _BIAS]
    dq, dk, dv, dbias, dsink = torch.ops.flexattn.bwd(
        dout if dout.stride(-1) == 1 else dout.contiguous(), q, k, v, out, lse, *args, bias_requires_grad
    )
    grads: list = [None] * len(args)
    if bias_requires_grad:
        grads[_BIAS] = dbias
    if ctx.needs_input_grad[3 + _SINKS]:
        grads[_SINKS] = dsink
    return (dq, dk, dv, *grads)


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
