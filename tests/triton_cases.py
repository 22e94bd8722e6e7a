"""One attention case checked end to end against the float64 oracle: shared by the CPU
(TRITON_INTERPRET=1) and GPU Triton test files.

`check_case` draws random inputs (never zeros) in the requested layout, runs `flexattn::fwd` (and
its autograd, i.e. `flexattn::bwd`) on the backend the environment selects, and compares out, lse
and every gradient with `attention_ref` in float64, with the tolerance rule of
`flexattn_ops.testing.assert_close_to_oracle` (2x the low-precision baseline's error + atol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from flexattn_ops import dispatch
from flexattn_ops.params import AttnArgs
from flexattn_ops.reference import dropout_keep
from flexattn_ops.testing import assert_close_to_oracle, attention_ref


@dataclass
class Case:
    """Shapes: q (b, sq, hq, d), k (b, sk, hk, d), v (b, sk, hv, dv)."""

    b: int = 2
    sq: int = 17
    sk: int = 33
    hq: int = 2
    hk: int = 2
    hv: int = 2
    d: int = 32
    dv: int = 32
    dtype: torch.dtype = torch.float32
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None  # None, "h" ((hq,) slopes) or "bh" ((b, hq) slopes)
    bias: Optional[tuple[int, ...]] = None  # shape broadcastable to (b, hq, sq, sk)
    bias_grad: bool = True
    sinks: bool = False
    dropout_p: float = 0.0
    # "contiguous", "permuted" (b, h, s, d storage), "sliced" (padded rows) or "misaligned" (contiguous, one
    # element past a 16-byte boundary)
    layout: str = "contiguous"
    deterministic: bool = False
    check_grads: bool = True
    scale: Optional[float] = None
    extra: dict = field(default_factory=dict)


def _rand(shape: tuple[int, ...], dtype: torch.dtype, device: str, layout: str, gen: torch.Generator) -> Tensor:
    """Random (b, s, h, d) tensor stored contiguously, as a permutation of (b, h, s, d), as a slice, or
    contiguously one element past a 16-byte boundary."""
    b, s, h, d = shape
    if layout == "permuted":
        return torch.randn((b, h, s, d), generator=gen, device="cpu").to(device=device, dtype=dtype).transpose(1, 2)
    if layout == "sliced":
        big = torch.randn((b, s + 3, h + 1, d + 8), generator=gen, device="cpu").to(device=device, dtype=dtype)
        return big[:, 2 : 2 + s, 1:, :d]
    if layout == "misaligned":
        flat = torch.randn(b * s * h * d + 1, generator=gen, device="cpu").to(device=device, dtype=dtype)
        return flat[1:].view(shape)
    return torch.randn(shape, generator=gen, device="cpu").to(device=device, dtype=dtype)


def make_inputs(c: Case, device: str, seed: Optional[int] = None):
    """Random inputs; the seed defaults to torch's current one (conftest draws a fresh one per run)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else seed)
    q = _rand((c.b, c.sq, c.hq, c.d), c.dtype, device, c.layout, gen)
    k = _rand((c.b, c.sk, c.hk, c.d), c.dtype, device, c.layout, gen)
    v = _rand((c.b, c.sk, c.hv, c.dv), c.dtype, device, c.layout, gen)
    slopes = None
    if c.alibi is not None:
        shape = (c.hq,) if c.alibi == "h" else (c.b, c.hq)
        slopes = (torch.rand(shape, generator=gen) * 0.5 + 0.05).to(device)
    bias = None
    if c.bias is not None:
        bias = torch.randn(c.bias, generator=gen).to(device=device, dtype=c.dtype)
    sinks = (torch.randn((c.hq,), generator=gen) + 1.0).to(device) if c.sinks else None
    rng = torch.tensor([int(torch.randint(0, 2**31 - 1, (1,), generator=gen)), 12345], dtype=torch.int64, device=device)
    dout = torch.randn((c.b, c.sq, c.hq, c.dv), generator=gen).to(device=device, dtype=c.dtype)
    return q, k, v, slopes, bias, sinks, rng, dout


def attn_args(c: Case, slopes, bias, sinks, rng) -> AttnArgs:
    left, right = c.window
    if c.causal:
        right = 0
    return AttnArgs(
        softmax_scale=c.scale if c.scale is not None else 1.0 / math.sqrt(c.d),
        window_left=left,
        window_right=right,
        softcap=c.softcap,
        alibi_slopes=slopes,
        attn_bias=bias,
        sinks=sinks,
        dropout_p=c.dropout_p,
        rng_state=rng if c.dropout_p > 0 else None,
        deterministic=c.deterministic,
    )


def dropout_mask(c: Case, rng: Tensor) -> Optional[Tensor]:
    """(b, hq, sq, sk) bool: the mask every backend draws (reference.dropout_keep)."""
    if c.dropout_p == 0:
        return None
    dev = rng.device
    bh = (torch.arange(c.b, device=dev)[:, None] * c.hq + torch.arange(c.hq, device=dev)[None, :])[..., None]
    i = torch.arange(c.sq, device=dev).expand(c.b, c.hq, c.sq)
    j = torch.arange(c.sk, device=dev).expand(c.b, c.hq, c.sk)
    return dropout_keep(rng, bh, i, j, c.dropout_p)


def run_ours(q, k, v, a: AttnArgs, dout: Tensor, want_grads: bool, bias_grad: bool = True):
    """out, lse and (dq, dk, dv[, dbias][, dsink]) through the op and its autograd."""
    extra = [t for t in (a.attn_bias if bias_grad else None, a.sinks) if t is not None]
    leaves = [q, k, v] + extra
    if want_grads:
        for t in leaves:
            t.requires_grad_(True)
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    grads: tuple = ()
    if want_grads:
        grads = tuple(torch.autograd.grad(out, leaves, dout))
        for t in leaves:
            t.requires_grad_(False)
    return out.detach(), lse.detach(), grads


def oracle(c: Case, q, k, v, slopes, bias, sinks, keep, dout, dtype: torch.dtype, want_grads: bool):
    """attention_ref in `dtype` (float64 = the oracle; q.dtype = the baseline): out, lse, grads."""
    leaves = [x.detach().to(dtype if dtype == torch.float64 else x.dtype) for x in (q, k, v)]
    extra = []
    if bias is not None:
        extra.append(bias.detach().to(torch.float64) if dtype == torch.float64 else bias.detach().clone())
    if sinks is not None:
        extra.append(sinks.detach().to(torch.float64) if dtype == torch.float64 else sinks.detach().clone())
    if want_grads:
        for t in leaves + extra:
            t.requires_grad_(True)
    it = iter(extra)
    b_ = next(it) if bias is not None else None
    s_ = next(it) if sinks is not None else None
    out, lse = attention_ref(
        *leaves,
        softmax_scale=c.scale if c.scale is not None else 1.0 / math.sqrt(c.d),
        causal=c.causal,
        window_size=c.window,
        softcap=c.softcap,
        alibi_slopes=slopes,
        attn_bias=b_,
        sinks=s_,
        dropout_p=c.dropout_p,
        dropout_keep=keep,
        compute_dtype=dtype,
    )
    grads: tuple = ()
    if want_grads:
        grads = torch.autograd.grad(out, leaves + extra, dout.to(out.dtype), allow_unused=True)
    return out.detach(), lse.detach(), grads


def check_case(c: Case, device: str, seed: Optional[int] = None, expect_backend: str = "triton") -> None:
    """Forward and backward of case `c` on `device` against the float64 oracle."""
    q, k, v, slopes, bias, sinks, rng, dout = make_inputs(c, device, seed)
    a = attn_args(c, slopes, bias, sinks, rng)
    assert dispatch.explain("fwd", q, k, v, a).selected == expect_backend
    keep = dropout_mask(c, rng)
    bias_needs_grad = bias is not None and c.bias_grad
    ours_out, ours_lse, ours_grads = run_ours(q, k, v, a, dout, c.check_grads, c.bias_grad)
    ref_out, ref_lse, ref_grads = oracle(c, q, k, v, slopes, bias, sinks, keep, dout, torch.float64, c.check_grads)
    base_out, base_lse, base_grads = oracle(c, q, k, v, slopes, bias, sinks, keep, dout, c.dtype, c.check_grads)
    assert ours_out.shape == (c.b, c.sq, c.hq, c.dv) and ours_out.is_contiguous()
    assert ours_lse.shape == (c.b, c.hq, c.sq) and ours_lse.dtype == torch.float32 and ours_lse.is_contiguous()
    atol = 1e-5 if c.dtype == torch.float32 else 1e-3
    assert_close_to_oracle("out", ours_out, ref_out, base_out, atol=atol)
    assert_close_to_oracle("lse", ours_lse, ref_lse, base_lse.float(), atol=atol)
    if not c.check_grads:
        return
    names = ["dq", "dk", "dv"] + (["dbias"] if bias is not None else []) + (["dsink"] if sinks is not None else [])
    if bias is not None and not bias_needs_grad:  # no dbias from us: drop the oracle's
        keep_idx = [i for i, n in enumerate(names) if n != "dbias"]
        names = [names[i] for i in keep_idx]
        ref_grads = tuple(ref_grads[i] for i in keep_idx)
        base_grads = tuple(base_grads[i] for i in keep_idx)
    for name, ours, ref, base in zip(names, ours_grads, ref_grads, base_grads, strict=True):
        gatol = 1e-4 if c.dtype == torch.float32 else 1e-2
        if name == "dsink":  # a sum over b * sq rows: its error grows with the row count
            gatol *= c.b * c.sq
        assert_close_to_oracle(name, ours, ref, base, atol=gatol)
    dq, dk, dv = ours_grads[:3]
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dv.dtype == v.dtype
    for grad, x in ((dq, q), (dk, k), (dv, v)):  # each gradient in its input's layout, as bwd's fake says
        assert grad.stride() == torch.empty_like(x).stride()


def backward_twice_equal(c: Case, device: str, reps: int = 2, seed: Optional[int] = None) -> None:
    """`reps` forward+backward runs give bitwise-identical out, lse and gradients."""
    q, k, v, slopes, bias, sinks, rng, dout = make_inputs(c, device, seed)
    a = attn_args(c, slopes, bias, sinks, rng)
    first = None
    for _ in range(reps):
        out, lse, grads = run_ours(q, k, v, a, dout, True)
        res = (out, lse, *grads)
        if first is None:
            first = res
            continue
        for x, y in zip(first, res, strict=True):
            assert torch.equal(x, y), "outputs differ between identical runs"
