"""The Triton backend: dense and varlen (packed or paged keys) attention forward and backward,
dense probs (SPEC section 4).

`dispatch` imports this module lazily; TRITON_INTERPRET must be set before that import for the
kernels to run on CPU tensors. All launches take explicit strides (inputs are last-dim contiguous
but may be permuted or sliced), allocate outputs from shapes only, and never synchronise with the
host, so CUDA-graph capture works (autotuning is skipped while capturing). Varlen grids are sized
by the Python-int max_seqlen_q/k; cu_seqlens are read only by the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from flexattn_ops import triton_launch
from flexattn_ops import triton_tuning as tuning
from flexattn_ops.params import AttnArgs
from flexattn_ops.reference import as_grad_of, dropout_threshold
from flexattn_ops.triton_bwd import attn_bwd_kernel, bwd_preprocess_kernel
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
    if q.dtype not in _DTYPES:
        return f"the Triton backend runs float16, bfloat16 and float32, got {q.dtype}"
    if q.shape[-1] > MAX_HEADDIM or v.shape[-1] > MAX_HEADDIM:
        return f"head dims up to {MAX_HEADDIM} on the Triton backend, got dqk={q.shape[-1]}, dv={v.shape[-1]}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return f"{name} must be contiguous in its last dim"
    return None


def _bias4(a: AttnArgs) -> tuple[Optional[Tensor], tuple[int, int, int, int]]:
    """attn_bias as a 4-d view and its strides with 0 on the broadcast (size-1) axes."""
    if a.attn_bias is None:
        return None, (0, 0, 0, 0)
    bias = a.attn_bias
    bias4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    strides = tuple(0 if bias4.shape[d] == 1 else bias4.stride(d) for d in range(4))
    return bias4, strides  # type: ignore[return-value]


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels write float32 in "upcast" mode and the host rounds (to nearest, unlike the interpreter)."""
    return torch.float32 if tuning.dot_precision(dtype) == "upcast" else dtype


class _Common(NamedTuple):
    """What every kernel takes alike: ``scalars`` (sm_scale, softcap, window_left, window_right,
    drop_threshold, in the kernels' order), ``flags`` (the HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
    HAS_BIAS, HAS_DROPOUT constexprs), the dot ``precision`` and the alibi slopes' batch stride."""

    scalars: tuple[float, float, int, int, int]
    flags: dict
    precision: str
    stride_ab: int


def _common(q: Tensor, a: AttnArgs) -> _Common:
    has_alibi = a.alibi_slopes is not None
    scalars = (
        float(a.softmax_scale),
        float(a.softcap) if a.softcap > 0 else 1.0,
        max(int(a.window_left), 0),
        max(int(a.window_right), 0),
        dropout_threshold(a.dropout_p) if a.dropout_p > 0 else 0,
    )
    flags = {
        "HAS_LEFT": a.window_left >= 0,
        "HAS_RIGHT": a.window_right >= 0,
        "HAS_SOFTCAP": a.softcap > 0,
        "HAS_ALIBI": has_alibi,
        "HAS_BIAS": a.attn_bias is not None,
        "HAS_DROPOUT": a.dropout_p > 0,
    }
    stride_ab = (a.alibi_slopes.stride(0) if a.alibi_slopes.dim() == 2 else 0) if has_alibi else 0
    return _Common(scalars, flags, tuning.dot_precision(q.dtype), stride_ab)


def _placeholder(q: Tensor, t: Optional[Tensor]) -> Tensor:
    """Kernels take a pointer for every optional tensor. An absent one gets q's, which the kernel never
    reads (its feature flag is off): allocating dummies cost ~3 us of host time each per call."""
    return t if t is not None else q


def _rng(q: Tensor, a: AttnArgs) -> Tensor:
    """The dropout [seed, offset] tensor (validation requires it with dropout_p > 0); else q's pointer."""
    return a.rng_state if a.dropout_p > 0 and a.rng_state is not None else q


def _launch_opts(cfg: tuning.Config) -> dict:
    if tuning.interpreting():
        return {}
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


class _Seqs(NamedTuple):
    """How the kernels find each sequence: dense batches or packed/paged varlen (see attn_fwd_kernel).

    ``ints`` are the kernels' (stride_tb, page_size, total_q) arguments, after the (CuQ, CuK, SeqUsed, Table)
    pointers of `_seq_tensors`; ``flags`` their VARLEN, PAGED, HAS_SEQUSED constexprs; ``batch``, ``sq``,
    ``sk`` size the grids (varlen: the number of sequences and max_seqlen_q/k, from the Python-int arguments:
    no host sync); ``page_size`` is the paged cache's (0 when not paged).
    """

    ints: tuple[int, int, int]
    flags: dict
    batch: int
    sq: int
    sk: int
    page_size: int = 0

    def key_flags(self, block_n: int) -> dict:
        """flags plus PAGE_TILE_ALIGNED for key tiles of `block_n` (the launched config's BLOCK_N)."""
        return {**self.flags, "PAGE_TILE_ALIGNED": tuning.page_tile_aligned(self.page_size, block_n)}


def _seqs(q: Tensor, k: Tensor, a: AttnArgs) -> _Seqs:
    if not a.is_varlen:
        flags = {"VARLEN": False, "PAGED": False, "HAS_SEQUSED": False}
        return _Seqs((0, 1, 0), flags, q.shape[0], q.shape[1], k.shape[1])
    assert a.cu_seqlens_q is not None
    paged = a.block_table is not None
    ints = (a.block_table.shape[1] if paged else 0, k.shape[1] if paged else 1, q.shape[0])  # type: ignore[union-attr]
    flags = {"VARLEN": True, "PAGED": paged, "HAS_SEQUSED": a.seqused_k is not None}
    page_size = k.shape[1] if paged else 0
    return _Seqs(ints, flags, a.cu_seqlens_q.shape[0] - 1, int(a.max_seqlen_q), int(a.max_seqlen_k), page_size)


def _seq_tensors(q: Tensor, a: AttnArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kernels' (CuQ, CuK, SeqUsed, Table) pointers: the varlen tensors (block_table made row-major: its
    row stride is then its width, `_Seqs.ints`), else q's, which dense kernels never read."""
    if not a.is_varlen:
        return q, q, q, q
    table = a.block_table.contiguous() if a.block_table is not None else None
    return (
        a.cu_seqlens_q.contiguous(),  # type: ignore[union-attr]
        a.cu_seqlens_k.contiguous(),  # type: ignore[union-attr]
        _placeholder(q, a.seqused_k),
        _placeholder(q, table),
    )


# A call's launch arguments are assembled once per signature and kept as a plan: the launches with the call's
# tensors left out (triton_launch.Launch). A signature holds what the assembly reads: every tensor's shape,
# strides and dtype (the kernels read their values, the host only their layout), the device and the scalar
# arguments. Plans are kept only once every configuration they use is settled (tuning.settled): a call that
# may not tune yet (CUDA-graph capture, autotuning off) takes a fallback it must not keep.
_plans: dict[tuple, tuple[triton_launch.Launch, ...]] = {}
_MAX_PLANS = 1024


def _signature(tensors: tuple[Tensor, ...], a: AttnArgs) -> tuple:
    return (
        tensors[0].device,
        *[(t.shape, t.stride(), t.dtype) for t in tensors],
        *[(x.shape, x.stride(), x.dtype) if isinstance(x, Tensor) else x for x in a],
    )


def _planned(key: tuple, build: Callable[[], tuple[tuple[triton_launch.Launch, ...], bool]]):
    """The plan kept for `key`, else `build()`'s (plan, settled), kept when settled."""
    plan = _plans.get(key)
    if plan is None:
        plan, settled = build()
        if settled:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    return plan


def _strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, sequence, head) strides: packed varlen (total, h, d) tensors have no batch axis (0). One
    stride() call, sliced: 0.15 us against 0.56 for three stride(i) calls, 12 times a step."""
    s = t.stride()
    return (0, s[0], s[1]) if len(s) == 3 else s[:3]


def _nonempty(t: Tensor) -> Tensor:
    """Varlen inputs may hold no token at all; kernels then never load, but need a valid pointer."""
    return t if t.numel() > 0 else t.new_empty(1)


def fwd(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> tuple[Tensor, Tensor]:
    """Dense: q (b, sq, hq, dqk), k (b, sk, hk, dqk), v (b, sk, hv, dv) -> out (b, sq, hq, dv), lse (b, hq, sq) f32.

    Varlen: q (total_q, hq, dqk), k/v packed (total_k, h, d) or paged (num_pages, page_size, h, d) ->
    out (total_q, hq, dv), lse (hq, total_q); query tokens past cu_seqlens_q[-1] get out 0, lse -inf.
    """
    hq = q.shape[-2]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=_store_dtype(q.dtype))
    lse = q.new_empty((hq, q.shape[0]) if a.is_varlen else (q.shape[0], hq, q.shape[1]), dtype=torch.float32)
    if out.numel() == 0:
        return out.to(q.dtype), lse
    bias4 = _bias4(a)[0]
    tensors = (
        q,
        _nonempty(k),
        _nonempty(v),
        out,
        lse,
        _placeholder(q, bias4),
        _placeholder(q, a.alibi_slopes),
        _placeholder(q, a.sinks),
        _rng(q, a),
        *_seq_tensors(q, a),
    )
    plan = _planned(("fwd", *_signature((q, k, v), a)), lambda: _fwd_plan(q, k, v, out, a, tensors))
    triton_launch.run(plan, tensors)
    return out.to(q.dtype), lse


def _fwd_plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor, a: AttnArgs, tensors: tuple[Tensor, ...]):
    """fwd's one launch, its configuration tuned on `tensors` if nobody has yet; and whether it is settled."""
    hq, dqk = q.shape[-2], q.shape[-1]
    hk, hv, dv = k.shape[-2], v.shape[-2], v.shape[-1]
    seqs = _seqs(q, k, a)
    c = _common(q, a)
    bstr = _bias4(a)[1]
    # varlen: one more row of programs (sequence `batch`) writes the rows past cu_seqlens_q[-1]
    n_seq = seqs.batch + 1 if a.is_varlen else seqs.batch
    args = (
        *seqs.ints,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        *bstr,
        c.stride_ab,
        hq,
        hq // hk,
        hq // hv,
        seqs.sq,
        seqs.sk,
        *c.scalars,
        1.0 / (1.0 - a.dropout_p),
    )

    def plan(cfg: tuning.Config) -> triton_launch.Launch:
        grid = (max(1, tuning.cdiv(seqs.sq, cfg["BLOCK_M"])), n_seq * hq)
        kwargs = dict(
            DQK=dqk,
            DV=dv,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_DQK=tuning.pad_dim(dqk),
            BLOCK_DV=tuning.pad_dim(dv),
            **c.flags,
            HAS_SINKS=a.sinks is not None,
            PLAIN=not (c.flags["HAS_SOFTCAP"] or c.flags["HAS_ALIBI"] or c.flags["HAS_BIAS"]) and a.softmax_scale > 0,
            PRECISION=c.precision,
            **seqs.key_flags(cfg["BLOCK_N"]),
            **_launch_opts(cfg),
        )
        return triton_launch.Launch(attn_fwd_kernel, grid, tuple(range(len(tensors))), args, kwargs)

    seqlen = max(seqs.sq, seqs.sk)
    cfg = tuning.get_config(
        "fwd", q.device, q.dtype, dqk, dv, a.is_causal, lambda cfg: triton_launch.run((plan(cfg),), tensors), seqlen
    )
    return (plan(cfg),), tuning.settled("fwd", q.device, q.dtype, dqk, dv, a.is_causal, seqlen)


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
    grid = (tuning.cdiv(sq, block), tuning.cdiv(sk, block), b * hq)
    triton_launch.launch(
        attn_probs_kernel,
        grid,
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
        c.stride_ab,
        hq,
        hq // hk,
        sq,
        sk,
        *c.scalars,
        DQK=dqk,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_DQK=tuning.pad_dim(dqk),
        **c.flags,
        PRECISION=c.precision,
    )
    return p


def _fusable(a: AttnArgs, kv_cfg: tuning.Config, q_cfg: tuning.Config) -> bool:
    """Whether the dK/dV and dQ programs can share a launch ("both"): the two configs compile alike (same
    warps and stages) and the inputs are dense (varlen keeps the dQ padding rows' extra sequence). Whether
    they do is the tuned "bwd" choice."""
    return not a.is_varlen and _launch_opts(kv_cfg) == _launch_opts(q_cfg)


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
    """Gradients (dq, dk, dv, dbias | None, dsink | None) in the layouts of q, k, v (fwd's docstring);
    always bitwise reproducible (no atomics; shared pages of a paged cache are summed by a sorted
    index_put). lse is (b, hq, sq) dense, (hq, total_q) varlen."""
    hq, dqk = q.shape[-2], q.shape[-1]
    hk, hv, dv = k.shape[-2], v.shape[-2], v.shape[-1]
    lse = lse.contiguous()  # (b, hq, sq) or (hq, total_q) row-major is what the kernels index
    want_dbias = bias_requires_grad and a.attn_bias is not None
    if q.numel() == 0 or k.numel() == 0:
        dbias = torch.zeros(a.attn_bias.shape, dtype=a.attn_bias.dtype, device=q.device) if want_dbias else None
        dsink = torch.zeros(a.sinks.shape, dtype=a.sinks.dtype, device=q.device) if a.sinks is not None else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias, dsink
    # gradients in their input's layout (empty_like: a permuted-dense input's strides), as bwd's fake says
    dq = torch.empty_like(q, dtype=_store_dtype(q.dtype))
    bias4 = _bias4(a)[0]
    # delta = rowsum(dO * O) in lse's layout: the dQ launch writes it for the dK/dV launch after it, or
    # bwd_preprocess_kernel does before a one-launch backward. Varlen rows past cu_seqlens_q[-1] belong to
    # no dQ program and keep 0 (dsink reads every row).
    delta = (torch.zeros if a.is_varlen else torch.empty)(lse.shape, dtype=torch.float32, device=q.device)

    # dK/dV: with hk == hv a program sums the query heads of its kv head in registers; otherwise
    # (hk != hv: k and v heads group query heads differently) per-query-head float32 buffers.
    # Varlen buffers start at zero: keys no sequence uses (past seqused_k or cu_seqlens_k[-1]) get
    # no program. Paged caches get per-(sequence, slot) float32 rows, summed onto the pages below.
    grouped = hk == hv
    n_groups = hk if grouped else hq
    paged = a.block_table is not None
    if paged:
        assert a.block_table is not None
        rows: tuple[int, ...] = (_seqs(q, k, a).batch, a.block_table.shape[1] * k.shape[1])
    else:
        rows = tuple(k.shape[:-2])
    kernel_writes_dkdv = grouped and not paged  # otherwise float32 buffers, reduced here
    if kernel_writes_dkdv:
        alloc_like = torch.zeros_like if a.is_varlen else torch.empty_like
        dk_buf = alloc_like(k, dtype=_store_dtype(k.dtype))
        dv_buf = alloc_like(v, dtype=_store_dtype(v.dtype))
    else:
        alloc = torch.zeros if a.is_varlen else torch.empty
        dk_buf = alloc((*rows, n_groups, dqk), dtype=torch.float32, device=q.device)
        dv_buf = alloc((*rows, n_groups, dv), dtype=torch.float32, device=q.device)
    dbias_full = None
    if want_dbias:
        seqs = _seqs(q, k, a)
        dbias_full = torch.zeros((seqs.batch, hq, seqs.sq, seqs.sk), dtype=torch.float32, device=q.device)
    tensors = (
        q,
        k,
        v,
        out,
        dout,
        lse,
        delta,
        dq,
        dk_buf,
        dv_buf,
        _placeholder(q, dbias_full),
        _placeholder(q, bias4),
        _placeholder(q, a.alibi_slopes),
        _rng(q, a),
        *_seq_tensors(q, a),
    )
    signature = ("bwd", bias_requires_grad, *_signature((dout, q, k, v, out, lse), a))
    plan = _planned(signature, lambda: _bwd_plan(q, k, v, a, tensors, want_dbias))
    triton_launch.run(plan, tensors)
    # deterministic reduction over the query heads reading each k / v head, then over the sequences
    # sharing each page
    dk = dk_buf if grouped else dk_buf.view(*rows, hk, hq // hk, dqk).sum(-2)
    dvv = dv_buf if grouped else dv_buf.view(*rows, hv, hq // hv, dv).sum(-2)
    if paged:
        assert a.block_table is not None
        dk, dvv = _sum_pages(dk, k, a.block_table), _sum_pages(dvv, v, a.block_table)
    if kernel_writes_dkdv:
        dk, dvv = dk.to(k.dtype), dvv.to(v.dtype)  # strides kept: no copy unless "upcast" stored float32
    else:
        dk, dvv = as_grad_of(dk, k), as_grad_of(dvv, v)

    dbias = None
    if want_dbias:
        assert a.attn_bias is not None and bias4 is not None and dbias_full is not None
        reduce_dims = [d for d in range(4) if bias4.shape[d] == 1 and dbias_full.shape[d] != 1]
        g = dbias_full.sum(reduce_dims, keepdim=True) if reduce_dims else dbias_full
        dbias = g.reshape(a.attn_bias.shape).to(a.attn_bias.dtype)
    dsink = None
    if a.sinks is not None:
        # dsink_h = -sum_{b,i} exp(sink_h - lse_bhi) * delta_bhi (the sink's probability times rowsum(dO * O));
        # varlen rows past cu_seqlens_q[-1] have lse -inf and delta 0: they add nothing (not inf * 0)
        p_sink = torch.exp(a.sinks.float()[:, None] - lse).masked_fill(torch.isneginf(lse), 0.0)
        dsink = (-(p_sink * delta).reshape(-1, hq, lse.shape[-1]).sum((0, 2))).to(a.sinks.dtype)
    return dq.to(q.dtype), dk, dvv, dbias, dsink


def _bwd_plan(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs, tensors: tuple[Tensor, ...], want_dbias: bool):
    """bwd's launches (the preprocess and one dK/dV+dQ launch, or the dQ launch then the dK/dV launch), their
    configurations tuned on `tensors` if nobody has yet; and whether they are settled."""
    hq, dqk = q.shape[-2], q.shape[-1]
    hk, hv, dv = k.shape[-2], v.shape[-2], v.shape[-1]
    out, dout, dq, dk_buf, dv_buf = (tensors[i] for i in (3, 4, 7, 8, 9))
    seqs = _seqs(q, k, a)
    b, sq, sk = seqs.batch, seqs.sq, seqs.sk
    n_groups, group = (hk, hq // hk) if hk == hv else (hq, 1)
    c = _common(q, a)
    n_seq = b + 1 if a.is_varlen else b  # varlen: sequence `batch` zeroes dq past cu_seqlens_q[-1]
    args = (
        *seqs.ints,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        *_strides(dout),
        *_strides(dq),
        *_strides(dk_buf),
        *_strides(dv_buf),
        *_bias4(a)[1],
        c.stride_ab,
        hq,
        n_groups,
        group,
        hq // hk,
        hq // hv,
        sq,
        sk,
        *c.scalars,
        1.0 / (1.0 - a.dropout_p),
    )
    flags = {
        "DQK": dqk,
        "DV": dv,
        "BLOCK_DQK": tuning.pad_dim(dqk),
        "BLOCK_DV": tuning.pad_dim(dv),
        **c.flags,
        "HAS_DBIAS": want_dbias,
        "PRECISION": c.precision,
    }
    every_tensor = tuple(range(len(tensors)))

    def part(
        name: str,
        grid: tuple[int, int],
        kv_cfg: tuning.Config,
        q_cfg: tuning.Config,
        key_block: int,
        n_key_tiles: int = 0,
    ) -> triton_launch.Launch:
        kwargs = dict(
            DKDV_BLOCK_M=kv_cfg["BLOCK_M"],
            DKDV_BLOCK_N=kv_cfg["BLOCK_N"],
            DQ_BLOCK_M=q_cfg["BLOCK_M"],
            DQ_BLOCK_N=q_cfg["BLOCK_N"],
            PART=name,
            **flags,
            **seqs.key_flags(key_block),
            **_launch_opts(kv_cfg),
        )
        return triton_launch.Launch(attn_bwd_kernel, grid, every_tensor, (*args, n_key_tiles), kwargs)

    def dkdv(cfg: tuning.Config) -> triton_launch.Launch:
        return part("dkdv", (max(1, tuning.cdiv(sk, cfg["BLOCK_N"])), b * n_groups), cfg, cfg, cfg["BLOCK_N"])

    def dq_part(cfg: tuning.Config) -> triton_launch.Launch:
        return part("dq", (max(1, tuning.cdiv(sq, cfg["BLOCK_M"])), n_seq * hq), cfg, cfg, cfg["BLOCK_N"])

    def parts(choice: tuning.Config) -> tuple[triton_launch.Launch, ...]:
        if not choice["one_launch"]:
            return dq_part(q_cfg), dkdv(kv_cfg)
        block = 16 if tuning.interpreting() else 64
        preprocess = triton_launch.Launch(
            bwd_preprocess_kernel,
            (tuning.cdiv(sq, block), b * hq),
            (3, 4, 6),  # out, dout, delta
            (*_strides(out), *_strides(dout), hq, sq),
            dict(DV=dv, BLOCK_M=block, BLOCK_DV=tuning.pad_dim(dv)),
        )
        n_key_tiles = tuning.cdiv(sk, kv_cfg["BLOCK_N"])
        grid = (n_key_tiles + tuning.cdiv(sq, q_cfg["BLOCK_M"]) * group, b * n_groups)
        return preprocess, part("both", grid, kv_cfg, q_cfg, kv_cfg["BLOCK_N"], n_key_tiles)

    seqlen = max(sq, sk)
    tuned = (q.device, q.dtype, dqk, dv, a.is_causal)
    # dQ first: when both are tuned, the dQ candidates write delta before the dK/dV candidates read it (a dK/dV
    # tune alone times them on delta as it is: no branch depends on its values)
    q_cfg = tuning.get_config("dq", *tuned, lambda cfg: triton_launch.run((dq_part(cfg),), tensors), seqlen)
    kv_cfg = tuning.get_config("dkdv", *tuned, lambda cfg: triton_launch.run((dkdv(cfg),), tensors), seqlen)
    settled = tuning.settled("dq", *tuned, seqlen) and tuning.settled("dkdv", *tuned, seqlen)
    choice: tuning.Config = {"one_launch": 0}
    if _fusable(a, kv_cfg, q_cfg):
        choice = tuning.get_config("bwd", *tuned, lambda cfg: triton_launch.run(parts(cfg), tensors), seqlen)
        settled = settled and tuning.settled("bwd", *tuned, seqlen)
    return parts(choice), settled


def _sum_pages(d_slots: Tensor, cache: Tensor, block_table: Tensor) -> Tensor:
    """Gradients of the slots (b, max_pages * page_size, h, d) float32 summed onto the cache pages
    (num_pages, page_size, h, d) they were read from; pages no sequence lists get 0. index_put with
    accumulate sorts the indices, so pages shared by several sequences sum in a fixed order."""
    grad = torch.zeros(cache.shape, dtype=torch.float32, device=cache.device)
    pages = d_slots.reshape(-1, *cache.shape[1:])
    return grad.index_put_((block_table.reshape(-1).long(),), pages, accumulate=True)
