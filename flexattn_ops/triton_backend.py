"""The Triton backend: dense attention forward, backward and probs (SPEC section 4).

`dispatch` imports this module lazily; TRITON_INTERPRET must be set before that import for the
kernels to run on CPU tensors. All launches take explicit strides (inputs are last-dim contiguous
but may be permuted or sliced), allocate outputs from shapes only, and never synchronise with the
host, so CUDA-graph capture works (autotuning is skipped while capturing).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from flexattn_ops import triton_tuning as tuning
from flexattn_ops.params import AttnArgs
from flexattn_ops.reference import dropout_threshold
from flexattn_ops.triton_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, bwd_preprocess_kernel
from flexattn_ops.triton_decode import combine, fwd_kvcache  # noqa: F401  (the KV-cache ops, triton_decode.py)
from flexattn_ops.triton_decode import unsupported as _decode_unsupported
from flexattn_ops.triton_fwd import attn_fwd_kernel, attn_probs_kernel

MAX_HEADDIM = 256  # the padded tiles of a 256 head dim already fill the register file (fwd, 128 x 256 fp32)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(op: str, q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> Optional[str]:
    """None if this backend runs `op` (fwd, bwd, probs, fwd_kvcache, combine) on these inputs, else why not."""
    if op in ("fwd_kvcache", "combine"):
        return _decode_unsupported(op, q, k, v, a)
    if op not in ("fwd", "bwd", "probs"):
        return f"the Triton backend has no {op!r} op"
    if a.is_varlen or a.block_table is not None:
        return "varlen inputs are not yet on the Triton backend"
    if q.dtype not in _DTYPES:
        return f"the Triton backend runs float16, bfloat16 and float32, got {q.dtype}"
    if q.shape[-1] > MAX_HEADDIM or v.shape[-1] > MAX_HEADDIM:
        return f"head dims up to {MAX_HEADDIM} on the Triton backend, got dqk={q.shape[-1]}, dv={v.shape[-1]}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return f"{name} must be contiguous in its last dim"
    return None


def _pad(d: int) -> int:
    # tl.dot needs every tile dim >= 16; padding to powers of two costs masked lanes only
    return max(16, triton.next_power_of_2(d))


def _bias4(a: AttnArgs) -> tuple[Optional[Tensor], tuple[int, int, int, int]]:
    """attn_bias as a 4-d view and its strides with 0 on the broadcast (size-1) axes."""
    if a.attn_bias is None:
        return None, (0, 0, 0, 0)
    bias = a.attn_bias
    bias4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    strides = tuple(0 if bias4.shape[d] == 1 else bias4.stride(d) for d in range(4))
    return bias4, strides  # type: ignore[return-value]


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision: exact float32 products for float32 inputs (tf32 would miss the oracle tolerance)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and tuning.interpreting():
        return "upcast"  # the interpreter's dot mis-reads bfloat16 tiles (see triton_common.mm)
    return "tf32"  # ignored for 16-bit inputs


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels write float32 in "upcast" mode and the host rounds (to nearest, unlike the interpreter)."""
    return torch.float32 if _precision(dtype) == "upcast" else dtype


def _common(q: Tensor, a: AttnArgs) -> dict:
    """Scalar kernel arguments and feature flags shared by every kernel."""
    has_alibi = a.alibi_slopes is not None
    return {
        "sm_scale": float(a.softmax_scale),
        "softcap": float(a.softcap) if a.softcap > 0 else 1.0,
        "window_left": max(int(a.window_left), 0),
        "window_right": max(int(a.window_right), 0),
        "drop_threshold": dropout_threshold(a.dropout_p) if a.dropout_p > 0 else 0,
        "HAS_LEFT": a.window_left >= 0,
        "HAS_RIGHT": a.window_right >= 0,
        "HAS_SOFTCAP": a.softcap > 0,
        "HAS_ALIBI": has_alibi,
        "HAS_BIAS": a.attn_bias is not None,
        "HAS_DROPOUT": a.dropout_p > 0,
        "PRECISION": _precision(q.dtype),
        "stride_ab": (a.alibi_slopes.stride(0) if a.alibi_slopes.dim() == 2 else 0) if has_alibi else 0,
    }


def _placeholder(q: Tensor, t: Optional[Tensor]) -> Tensor:
    """Kernels take a pointer for every optional tensor; absent ones get a 1-element dummy."""
    return t if t is not None else q.new_empty(1, dtype=torch.float32)


def _rng(q: Tensor, a: AttnArgs) -> Tensor:
    return a.rng_state if a.dropout_p > 0 and a.rng_state is not None else q.new_zeros(2, dtype=torch.int64)


def _launch_opts(cfg: tuning.Config) -> dict:
    if tuning.interpreting():
        return {}
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def fwd(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> tuple[Tensor, Tensor]:
    """q (b, sq, hq, dqk), k (b, sk, hk, dqk), v (b, sk, hv, dv) -> out (b, sq, hq, dv), lse (b, hq, sq) f32."""
    b, sq, hq, dqk = q.shape
    sk, hk, hv, dv = k.shape[1], k.shape[2], v.shape[2], v.shape[3]
    out = q.new_empty((b, sq, hq, dv), dtype=_store_dtype(q.dtype))
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    if b * hq * sq == 0:
        return out.to(q.dtype), lse
    c = _common(q, a)
    bias4, bstr = _bias4(a)

    def launch(cfg: tuning.Config) -> None:
        grid = (triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)
        attn_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lse,
            _placeholder(q, bias4),
            _placeholder(q, a.alibi_slopes),
            _placeholder(q, a.sinks),
            _rng(q, a),
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *out.stride()[:3],
            *bstr,
            c["stride_ab"],
            hq,
            hq // hk,
            hq // hv,
            sq,
            sk,
            c["sm_scale"],
            c["softcap"],
            c["window_left"],
            c["window_right"],
            c["drop_threshold"],
            1.0 / (1.0 - a.dropout_p),
            DQK=dqk,
            DV=dv,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_DQK=_pad(dqk),
            BLOCK_DV=_pad(dv),
            HAS_LEFT=c["HAS_LEFT"],
            HAS_RIGHT=c["HAS_RIGHT"],
            HAS_SOFTCAP=c["HAS_SOFTCAP"],
            HAS_ALIBI=c["HAS_ALIBI"],
            HAS_BIAS=c["HAS_BIAS"],
            HAS_SINKS=a.sinks is not None,
            HAS_DROPOUT=c["HAS_DROPOUT"],
            PLAIN=not (c["HAS_SOFTCAP"] or c["HAS_ALIBI"] or c["HAS_BIAS"]) and a.softmax_scale > 0,
            PRECISION=c["PRECISION"],
            **_launch_opts(cfg),
        )

    launch(tuning.get_config("fwd", q.device, q.dtype, dqk, dv, a.is_causal, launch, max(sq, sk)))
    return out.to(q.dtype), lse


def probs(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> Tensor:
    """(b, hq, sq, sk) float32 softmax probabilities (sinks in the denominator), dropped entries negated."""
    b, sq, hq, dqk = q.shape
    sk, hk = k.shape[1], k.shape[2]
    _, lse = fwd(q, k, v, a)
    p = q.new_empty((b, hq, sq, sk), dtype=torch.float32)
    if p.numel() == 0:
        return p
    c = _common(q, a)
    bias4, bstr = _bias4(a)
    block = 16 if tuning.interpreting() else 64
    grid = (triton.cdiv(sq, block), triton.cdiv(sk, block), b * hq)
    attn_probs_kernel[grid](
        q,
        k,
        lse,
        p,
        _placeholder(q, bias4),
        _placeholder(q, a.alibi_slopes),
        _rng(q, a),
        *q.stride()[:3],
        *k.stride()[:3],
        *bstr,
        c["stride_ab"],
        hq,
        hq // hk,
        sq,
        sk,
        c["sm_scale"],
        c["softcap"],
        c["window_left"],
        c["window_right"],
        c["drop_threshold"],
        DQK=dqk,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_DQK=_pad(dqk),
        HAS_LEFT=c["HAS_LEFT"],
        HAS_RIGHT=c["HAS_RIGHT"],
        HAS_SOFTCAP=c["HAS_SOFTCAP"],
        HAS_ALIBI=c["HAS_ALIBI"],
        HAS_BIAS=c["HAS_BIAS"],
        HAS_DROPOUT=c["HAS_DROPOUT"],
        PRECISION=c["PRECISION"],
    )
    return p


def bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    a: AttnArgs,
    bias_requires_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients (dq, dk, dv, dbias | None, dsink | None); always bitwise reproducible (no atomics)."""
    b, sq, hq, dqk = q.shape
    sk, hk, hv, dv = k.shape[1], k.shape[2], v.shape[2], v.shape[3]
    lse = lse.contiguous()  # (b, hq, sq) row-major is what the kernels index
    dq = q.new_empty(q.shape, dtype=_store_dtype(q.dtype))
    want_dbias = bias_requires_grad and a.attn_bias is not None
    if b * hq * sq == 0 or sk == 0:
        dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        dbias = torch.zeros(a.attn_bias.shape, dtype=a.attn_bias.dtype, device=q.device) if want_dbias else None
        dsink = torch.zeros(a.sinks.shape, dtype=a.sinks.dtype, device=q.device) if a.sinks is not None else None
        dk0 = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
        return dq, dk0, torch.zeros(v.shape, dtype=v.dtype, device=v.device), dbias, dsink
    c = _common(q, a)
    bias4, bstr = _bias4(a)
    bias_arg = _placeholder(q, bias4)
    alibi_arg = _placeholder(q, a.alibi_slopes)
    rng = _rng(q, a)
    drop_rescale = 1.0 / (1.0 - a.dropout_p)

    delta = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    pre_block = 16 if tuning.interpreting() else 64
    bwd_preprocess_kernel[(triton.cdiv(sq, pre_block), b * hq)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], hq, sq, DV=dv, BLOCK_M=pre_block, BLOCK_DV=_pad(dv)
    )

    # dK/dV: with hk == hv a program sums the query heads of its kv head in registers; otherwise
    # (hk != hv: k and v heads group query heads differently) per-query-head float32 buffers.
    grouped = hk == hv
    if grouped:
        n_groups, group = hk, hq // hk
        dk_buf = torch.empty((b, sk, hk, dqk), dtype=_store_dtype(k.dtype), device=q.device)
        dv_buf = torch.empty((b, sk, hv, dv), dtype=_store_dtype(v.dtype), device=q.device)
    else:
        n_groups, group = hq, 1
        dk_buf = torch.empty((b, sk, hq, dqk), dtype=torch.float32, device=q.device)
        dv_buf = torch.empty((b, sk, hq, dv), dtype=torch.float32, device=q.device)

    def launch_dkdv(cfg: tuning.Config) -> None:
        attn_bwd_dkdv_kernel[(triton.cdiv(sk, cfg["BLOCK_N"]), b * n_groups)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk_buf,
            dv_buf,
            bias_arg,
            alibi_arg,
            rng,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *dout.stride()[:3],
            *dk_buf.stride()[:3],
            *dv_buf.stride()[:3],
            *bstr,
            c["stride_ab"],
            hq,
            n_groups,
            group,
            hq // hk,
            hq // hv,
            sq,
            sk,
            c["sm_scale"],
            c["softcap"],
            c["window_left"],
            c["window_right"],
            c["drop_threshold"],
            drop_rescale,
            DQK=dqk,
            DV=dv,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_DQK=_pad(dqk),
            BLOCK_DV=_pad(dv),
            HAS_LEFT=c["HAS_LEFT"],
            HAS_RIGHT=c["HAS_RIGHT"],
            HAS_SOFTCAP=c["HAS_SOFTCAP"],
            HAS_ALIBI=c["HAS_ALIBI"],
            HAS_BIAS=c["HAS_BIAS"],
            HAS_DROPOUT=c["HAS_DROPOUT"],
            PRECISION=c["PRECISION"],
            **_launch_opts(cfg),
        )

    launch_dkdv(tuning.get_config("dkdv", q.device, q.dtype, dqk, dv, a.is_causal, launch_dkdv, max(sq, sk)))
    if grouped:
        dk, dvv = dk_buf.to(k.dtype), dv_buf.to(v.dtype)
    else:
        # deterministic reduction over the query heads reading each k / v head
        dk = dk_buf.view(b, sk, hk, hq // hk, dqk).sum(3).to(k.dtype)
        dvv = dv_buf.view(b, sk, hv, hq // hv, dv).sum(3).to(v.dtype)

    dbias_full = torch.zeros((b, hq, sq, sk), dtype=torch.float32, device=q.device) if want_dbias else None

    def launch_dq(cfg: tuning.Config) -> None:
        attn_bwd_dq_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), b * hq)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dq,
            _placeholder(q, dbias_full),
            bias_arg,
            alibi_arg,
            rng,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *dout.stride()[:3],
            *dq.stride()[:3],
            *bstr,
            c["stride_ab"],
            hq,
            hq // hk,
            hq // hv,
            sq,
            sk,
            c["sm_scale"],
            c["softcap"],
            c["window_left"],
            c["window_right"],
            c["drop_threshold"],
            drop_rescale,
            DQK=dqk,
            DV=dv,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_DQK=_pad(dqk),
            BLOCK_DV=_pad(dv),
            HAS_LEFT=c["HAS_LEFT"],
            HAS_RIGHT=c["HAS_RIGHT"],
            HAS_SOFTCAP=c["HAS_SOFTCAP"],
            HAS_ALIBI=c["HAS_ALIBI"],
            HAS_BIAS=c["HAS_BIAS"],
            HAS_DBIAS=want_dbias,
            HAS_DROPOUT=c["HAS_DROPOUT"],
            PRECISION=c["PRECISION"],
            **_launch_opts(cfg),
        )

    launch_dq(tuning.get_config("dq", q.device, q.dtype, dqk, dv, a.is_causal, launch_dq, max(sq, sk)))

    dbias = None
    if want_dbias:
        assert a.attn_bias is not None and bias4 is not None and dbias_full is not None
        reduce_dims = [d for d in range(4) if bias4.shape[d] == 1 and dbias_full.shape[d] != 1]
        g = dbias_full.sum(reduce_dims, keepdim=True) if reduce_dims else dbias_full
        dbias = g.reshape(a.attn_bias.shape).to(a.attn_bias.dtype)
    dsink = None
    if a.sinks is not None:
        # dsink_h = -sum_{b,i} exp(sink_h - lse_bhi) * delta_bhi (the sink's probability times rowsum(dO * O))
        p_sink = torch.exp(a.sinks.float()[None, :, None] - lse)
        dsink = (-(p_sink * delta).sum((0, 2))).to(a.sinks.dtype)
    return dq.to(q.dtype), dk, dvv, dbias, dsink
