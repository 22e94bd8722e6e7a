"""The CUDA backend: the SM90 (Hopper, wgmma + TMA) forward kernel of csrc/, dense and varlen.

`unsupported` is the one table of what the kernel runs; everything else falls back (dispatch).
Backward has no CUDA kernel yet: `bwd` runs the Triton backward (else the reference's) on the
forward's out/lse, so autograd through a CUDA forward works. `dispatch` imports this module only
for CUDA tensors; `cuda_ext` loads or builds the extension on the first call that needs it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from flexattn_ops import cuda_ext
from flexattn_ops.cuda_build import Kernel
from flexattn_ops.params import AttnArgs

MAX_HEADDIM = 256
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_ALIGN = 8  # elements: TMA wants 16-byte strides and base addresses
_NO_KERNEL_OPS = {
    "probs": "the SM90 CUDA kernel does not return probabilities (Triton and the reference do)",
    "fwd_kvcache": "the CUDA backend has no KV-cache decode kernel yet (Triton runs it)",
    "combine": "the CUDA backend has no combine kernel (Triton runs it)",
}


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    """The compute capability of a CUDA device (None for other devices: nothing CUDA is touched).

    Cached per device index: with the uncached query and per-dimension stride calls, `unsupported` took
    16 us of an eager call's ~90 us of host time, 7.6 us after (H100; RESULTS_cuda.md, session 12)."""
    if device.type != "cuda":
        return None
    return _device_capability(torch.cuda.current_device() if device.index is None else device.index)


def _layout_problem(name: str, t: Tensor) -> Optional[str]:
    strides, sizes = t.stride(), t.shape  # read once: each t.stride(d) is a call into C++
    if strides[-1] != 1:
        return f"the SM90 CUDA kernel (TMA) needs {name} contiguous in its last dim"
    if any(s % _ALIGN and n != 1 for s, n in zip(strides[:-1], sizes[:-1], strict=True)):  # as csrc's check_operand
        return f"the SM90 CUDA kernel (TMA) needs {name}'s strides in multiples of {_ALIGN} elements, got {strides}"
    if t.data_ptr() % 16:
        return f"the SM90 CUDA kernel (TMA) needs {name} 16-byte aligned"
    return None


@functools.cache  # a scan of every built kernel per call otherwise
def _covered(kernels: frozenset[Kernel], dtype: str, dqk: int, dv: int) -> bool:
    return any(kn.dtype == dtype and kn.dqk >= dqk and kn.dv >= dv for kn in kernels)


def unsupported(op: str, q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> Optional[str]:
    """None if the CUDA backend runs `op` on these inputs, else what the CUDA kernel lacks.

    `bwd` is accepted exactly where `fwd` is (it runs the Triton backward on the CUDA forward's
    out/lse). The extension is loaded (JIT-built on first use) only after every cheap check passes.
    """
    if op in _NO_KERNEL_OPS:
        return _NO_KERNEL_OPS[op]
    if op not in ("fwd", "bwd"):
        return f"the CUDA backend has no {op!r} op"
    cap = _capability(q.device)
    if cap != (9, 0):
        return f"the SM90 CUDA kernel runs on compute capability 9.0 (Hopper) GPUs only, got {cap or q.device.type}"
    if q.dtype not in _DTYPES:
        return f"the SM90 CUDA kernel runs float16 and bfloat16, got {q.dtype} (Triton runs it)"
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk > MAX_HEADDIM or dv > MAX_HEADDIM or dqk % 8 or dv % 8:
        return (
            f"the SM90 CUDA kernel needs head dims that are multiples of 8 up to {MAX_HEADDIM}, got dqk={dqk}, dv={dv}"
        )
    features = (
        (a.alibi_slopes is not None, "ALiBi"),
        (a.attn_bias is not None, "attention bias"),
        (a.sinks is not None, "sinks"),
        (a.dropout_p > 0, "dropout"),
        (a.block_table is not None, "paged KV (block_table)"),
    )
    for present, feature in features:
        if present:
            return f"the SM90 CUDA kernel has no {feature} (Triton runs it)"
    if a.softmax_scale <= 0 and a.softcap <= 0:  # max(s * scale) is not scale * max(s) then
        return (
            f"the SM90 CUDA kernel takes row maxima of raw scores, so it needs softmax_scale > 0, got {a.softmax_scale}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        problem = _layout_problem(name, t)
        if problem:
            return problem
    reason = cuda_ext.available()
    if reason is not None:
        return reason
    dtype = _DTYPES[q.dtype]
    if not _covered(cuda_ext.kernels(), dtype, dqk, dv):
        built = ", ".join(sorted(kn.name for kn in cuda_ext.kernels())) or "none"
        return (
            f"the SM90 CUDA extension has no {dtype} kernel covering dqk={dqk}, dv={dv} "
            f"(built: {built}; FLEXATTN_CUDA_KERNELS selects them at build time)"
        )
    return None


def fwd(q: Tensor, k: Tensor, v: Tensor, a: AttnArgs) -> tuple[Tensor, Tensor]:
    """Dense: q (b, sq, hq, dqk), k (b, sk, hk, dqk), v (b, sk, hv, dv) -> out (b, sq, hq, dv), lse (b, hq, sq) f32.

    Varlen: q (total_q, hq, dqk), k (total_k, hk, dqk), v (total_k, hv, dv) with cu_seqlens_q/k
    (and optional seqused_k) -> out (total_q, hq, dv), lse (hq, total_q) f32. As in flash-attn,
    max_seqlen_q must be at least every sequence's length (it sizes the grid; rows past it are not
    computed), and seqused_k[b] at most sequence b's key count. Both contiguous; runs
    on the current stream.
    """
    hq, dv = q.shape[-2], v.shape[-1]
    out = q.new_empty((*q.shape[:-1], dv))
    lse = q.new_empty((hq, q.shape[0]) if a.is_varlen else (q.shape[0], hq, q.shape[1]), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if k.numel() == 0 or v.numel() == 0:  # no key anywhere (TMA cannot describe an empty tensor)
        return out.zero_(), lse.fill_(float("-inf"))
    max_seqlen_q = int(a.max_seqlen_q) if a.is_varlen else q.shape[1]
    torch.ops.flexattn_cuda.fwd_sm90(
        q,
        k,
        v,
        out,
        lse,
        None if a.cu_seqlens_q is None else a.cu_seqlens_q.contiguous(),
        None if a.cu_seqlens_k is None else a.cu_seqlens_k.contiguous(),
        None if a.seqused_k is None else a.seqused_k.contiguous(),
        max_seqlen_q,
        float(a.softmax_scale),
        int(a.window_left),
        int(a.window_right),
        float(a.softcap),
    )
    return out, lse


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
    """(dq, dk, dv, dbias | None, dsink | None) in the layouts of q, k, v: no SM90 backward yet, so the
    Triton backward (or the reference's where Triton cannot run) on this out/lse (fwd's shapes)."""
    from flexattn_ops import dispatch

    name = "triton" if dispatch.why_not("triton", "bwd", q, k, v, a) is None else "reference"
    return dispatch.backend_module(name).bwd(dout, q, k, v, out, lse, a, bias_requires_grad)
