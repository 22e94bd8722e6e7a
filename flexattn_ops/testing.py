"""The test oracle and the tolerance rule every correctness test uses.

`attention_ref` is attention written the simplest way (full score matrix, no blocking, no
tricks), in float64 by default. Called with ``compute_dtype=q.dtype`` it is the "plain PyTorch
implementation in the same low precision" whose error sets the tolerance: our error against the
float64 oracle must be at most 2x that baseline's error plus a small atol (`assert_close_to_oracle`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_keep: Optional[Tensor] = None,
    key_valid: Optional[Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """SPEC section 4, literally. q (b, sq, hq, d), k (b, sk, hk, d), v (b, sk, hv, dv).

    `dropout_keep` (b, hq, sq, sk) bool says which probabilities survive dropout; `key_valid`
    (b, sk) bool marks keys that exist (the rest are as if absent; bottom-right alignment then
    uses the number of valid keys, which must be a prefix). Returns out (b, sq, hq, dv) and
    lse (b, hq, sq), both in `compute_dtype`.
    """
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    qc, kc, vc = (x.to(compute_dtype) for x in (q, k, v))
    kc = kc.repeat_interleave(hq // k.shape[2], dim=2)
    vc = vc.repeat_interleave(hq // v.shape[2], dim=2)
    s = torch.einsum("bihd,bjhd->bhij", qc, kc) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    n_keys = torch.full((b,), sk, device=q.device) if key_valid is None else key_valid.sum(-1)
    i = torch.arange(sq, device=q.device)[None, :, None] + (n_keys - sq)[:, None, None]  # (b, sq, 1) aligned
    j = torch.arange(sk, device=q.device)[None, None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute_dtype)
        slopes = slopes[None, :] if slopes.dim() == 1 else slopes
        s = s - slopes[:, :, None, None] * (i - j).abs()[:, None].to(compute_dtype)
    if attn_bias is not None:
        s = s + attn_bias.to(compute_dtype)
    allowed = torch.ones(b, sq, sk, dtype=torch.bool, device=q.device)
    if key_valid is not None:
        allowed &= key_valid[:, None, :]
    left, right = window_size
    if causal:
        right = 0
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(compute_dtype)[None, :, None, None].expand(b, hq, sq, 1)
        s = torch.cat([s, sink_col], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with every key masked: p = 0
    if sinks is not None:
        p = p[..., :-1]
    if dropout_p > 0:
        assert dropout_keep is not None, "pass the dropout mask the kernel used"
        p = p * dropout_keep / (1 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", p.to(compute_dtype), vc)
    return out, lse


def assert_close_to_oracle(
    name: str, ours: Tensor, oracle: Tensor, baseline: Tensor, atol: float = 1e-5, factor: float = 2.0
) -> None:
    """Our max error vs the float64 oracle <= factor x the low-precision baseline's + atol; no NaN."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != oracle {tuple(oracle.shape)}"
    assert not torch.isnan(ours).any(), f"{name}: NaN in output"
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isfinite(ours), finite), f"{name}: infinities differ from the oracle"
    if finite.sum() == 0:
        return
    err = (ours.double() - oracle.double())[finite].abs().max().item()
    base = (baseline.double() - oracle.double())[finite].abs().max().item()
    assert err <= factor * base + atol, f"{name}: max error {err:.3g} > {factor} x baseline {base:.3g} + {atol:g}"


def assert_rel_close(name: str, ours: Tensor, oracle: Tensor, rtol: float = 1e-5, atol: float = 2e-6) -> None:
    """max |ours - oracle| <= rtol * max |oracle| + atol (float32 paths against the float64 oracle).

    The atol covers float32 rounding (~1e-7 per op) where the oracle is exactly 0, e.g. dq with one key.
    """
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isfinite(ours), finite), f"{name}: infinities differ from the oracle"
    if finite.sum() == 0:
        return
    err = (ours.double() - oracle.double())[finite].abs().max().item()
    ref = oracle.double()[finite].abs().max().item()
    assert err <= rtol * ref + atol, f"{name}: max error {err:.3g} > {rtol:g} x max |oracle| {ref:.3g} + {atol:g}"


def rotary_ref(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """Rotary embedding as complex multiplication in float64, returned in x's dtype. x (s, h, d),
    positions (s,) int, cos/sin (seqlen_ro, rotary_dim / 2); only the first rotary_dim dims turn."""
    half = cos.shape[1]
    pos = positions.to(cos.device)
    turn = torch.complex(cos[pos].double(), sin[pos].double())[:, None, :]  # (s, 1, half)
    xd = x.double()
    xr, rest = xd[..., : 2 * half], xd[..., 2 * half :]
    if interleaved:
        z = torch.view_as_complex(xr.reshape(*xr.shape[:-1], half, 2).contiguous()) * turn
        xr = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(xr[..., :half], xr[..., half:]) * turn
        xr = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((xr, rest), dim=-1).to(x.dtype)


def varlen_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    seqused_k: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """`attention_ref` on each packed sequence in turn. q (total_q, hq, d), k/v (total_k, h, d);
    returns out (total_q, hq, dv) and lse (hq, total_q). Per-batch alibi slopes (b, hq) are sliced;
    `seqused_k` keeps the first seqused_k[i] keys of sequence i. Other kwargs go to `attention_ref`.
    Rows outside every sequence (q beyond cu_seqlens_q[-1]) are left as out 0, lse -inf."""
    dtype = kwargs.get("compute_dtype", torch.float64)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else [ck[i + 1] - ck[i] for i in range(len(ck) - 1)]
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue
        keys = slice(ck[i], ck[i] + used[i])
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, s = attention_ref(q[None, cq[i] : cq[i + 1]], k[None, keys], v[None, keys], alibi_slopes=slopes, **kwargs)
        out[cq[i] : cq[i + 1]] = o[0]
        lse[:, cq[i] : cq[i + 1]] = s[0]
    return out, lse


def paged_to_packed(cache: Tensor, block_table: Tensor, lengths: Sequence[int]) -> Tensor:
    """The first lengths[i] slots of each sequence of a paged cache (num_blocks, page, h, d), packed."""
    page = cache.shape[1]
    rows = []
    for i, n in enumerate(lengths):
        slots = torch.arange(n, device=cache.device)
        rows.append(cache[block_table[i].long()[slots // page], slots % page])
    return torch.cat(rows) if rows else cache.new_empty((0, *cache.shape[2:]))


def kvcache_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    *,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens: Optional[Sequence[int]] = None,
    cache_batch_idx: Optional[Sequence[int]] = None,
    cache_leftpad: Optional[Sequence[int]] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
    **kwargs,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """flash_attn_with_kvcache by looping over sequences: returns out (b, sq, hq, dv), lse (b, hq, sq)
    in `compute_dtype`, and the expected caches after the append (clones of the inputs with the new,
    rotated keys written in the cache dtype). Lengths and indices are Python lists here."""
    b, sq = q.shape[:2]
    page = k_cache.shape[1]
    cache_len = block_table.shape[1] * page if block_table is not None else k_cache.shape[1]
    seqlens = list(cache_seqlens) if cache_seqlens is not None else [cache_len] * b
    leftpad = list(cache_leftpad) if cache_leftpad is not None else [0] * b
    rows = list(cache_batch_idx) if cache_batch_idx is not None else list(range(b))
    new_k_cache, new_v_cache = k_cache.clone(), v_cache.clone()
    s_new = 0 if k is None else k.shape[1]
    out = torch.zeros(b, sq, q.shape[2], v_cache.shape[-1], dtype=compute_dtype, device=q.device)
    lse = torch.zeros(b, q.shape[2], sq, dtype=compute_dtype, device=q.device)

    def where(i: int, slot: int) -> tuple[int, int]:
        if block_table is None:
            return rows[i], slot
        return int(block_table[i, slot // page]), slot % page

    local = causal or window_size[0] >= 0 or window_size[1] >= 0
    for i in range(b):
        qi = q[i].to(compute_dtype)
        if k is not None and v is not None:
            ki = k[i].to(compute_dtype)
            if rotary_cos is not None and rotary_sin is not None:
                start = seqlens[i] - leftpad[i]
                pos_k = torch.arange(s_new) + start
                pos_q = torch.arange(sq) + start if local else torch.full((sq,), start)
                ki = rotary_ref(ki, rotary_cos, rotary_sin, pos_k, rotary_interleaved)
                qi = rotary_ref(qi, rotary_cos, rotary_sin, pos_q, rotary_interleaved)
            for t in range(s_new):
                blk, off = where(i, seqlens[i] + t)
                new_k_cache[blk, off] = ki[t].to(k_cache.dtype)
                new_v_cache[blk, off] = v[i, t]
        # Attention reads the keys as stored: appended rotated keys carry the cache dtype's rounding.
        used = range(leftpad[i], seqlens[i] + s_new)
        keys = torch.stack([new_k_cache[where(i, j)] for j in used]) if len(used) else k_cache[:0, :0].flatten(0, 1)
        vals = torch.stack([new_v_cache[where(i, j)] for j in used]) if len(used) else v_cache[:0, :0].flatten(0, 1)
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, s = attention_ref(
            qi[None],
            keys[None],
            vals[None],
            causal=causal,
            window_size=window_size,
            alibi_slopes=slopes,
            compute_dtype=compute_dtype,
            **kwargs,
        )
        out[i], lse[i] = o[0], s[0]
    return out, lse, new_k_cache, new_v_cache


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor value on the host (.item(), bool(t)) or makes a
    data-dependent shape; ops run under it must be capturable in a CUDA graph. (CPU .tolist()
    reads memory without dispatching: trace with torch.compile(fullgraph=True) to catch it.)"""

    FORBIDDEN = (
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique_consecutive",
        "aten._unique2",
        "aten.repeat_interleave.Tensor",
    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket._qualified_op_name).replace("::", ".")
        if name in self.FORBIDDEN or f"{name}.{func._overloadname}" in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))
