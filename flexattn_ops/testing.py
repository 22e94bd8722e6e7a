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


def assert_rel_close(name: str, ours: Tensor, oracle: Tensor, rtol: float = 1e-5) -> None:
    """max |ours - oracle| <= rtol * max |oracle| (float32 paths against the float64 oracle)."""
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isfinite(ours), finite), f"{name}: infinities differ from the oracle"
    if finite.sum() == 0:
        return
    err = (ours.double() - oracle.double())[finite].abs().max().item()
    ref = oracle.double()[finite].abs().max().item()
    assert err <= rtol * max(ref, 1e-6), f"{name}: max error {err:.3g} > {rtol:g} x max |oracle| {ref:.3g}"
