"""Input factories shared by the test modules."""

from __future__ import annotations

import torch
from torch import Tensor


def rand_qkv(
    b: int,
    sq: int,
    sk: int,
    hq: int,
    hk: int,
    hv: int,
    dqk: int,
    dv: int,
    dtype: torch.dtype,
    requires_grad: bool = False,
    device: str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Random dense q (b, sq, hq, dqk), k (b, sk, hk, dqk), v (b, sk, hv, dv); never zeros."""

    def t(s: int, h: int, d: int) -> Tensor:
        return torch.randn(b, s, h, d, dtype=dtype, device=device).requires_grad_(requires_grad)

    return t(sq, hq, dqk), t(sk, hk, dqk), t(sk, hv, dv)


def layouts(x: Tensor, layout: str) -> Tensor:
    """The same values as x (b, s, h, d) in a contiguous, permuted-dense or sliced layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "permuted":  # stored (b, h, s, d), viewed (b, s, h, d)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":  # head dim slice of a wider buffer: last dim contiguous, rows strided
        wide = torch.randn(*x.shape[:-1], x.shape[-1] + 7, dtype=x.dtype, device=x.device)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    raise ValueError(layout)


def keys_growing_towards_start(k: Tensor, growth: float) -> Tensor:
    """k (b, sk, h, d) with key j scaled by 1 + growth * (sk - 1 - j) / 128: scores' row maxima grow by
    ~2.7 x growth (natural units) every 128 keys towards key 0, which a kernel walking key blocks last
    first meets as maxima that keep growing."""
    sk = k.shape[1]
    keys_from_end = torch.arange(sk - 1, -1, -1, device=k.device, dtype=torch.float32)
    return (k.float() * (1 + growth * keys_from_end / 128)[None, :, None, None]).to(k.dtype)
