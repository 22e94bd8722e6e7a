"""`fwd_kvcache` / `combine` on the Triton backend on a CUDA GPU (skipped without one): realistic decode and
append shapes against the float64 oracle (computed on the CPU), the caches after the call, and a
compiled decode step (`torch.compile(mode="reduce-overhead")`) of a small paged-cache decoder that runs
under CUDA graphs and matches eager. Run alone (not in the process of tests/test_triton_decode.py, which
turns on TRITON_INTERPRET).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os

import pytest
import torch

from flexattn_ops import flash_attn_with_kvcache
from flexattn_ops.testing import assert_close_to_oracle, assert_rel_close
from tests.test_kvcache import Case, make_case

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs compiled kernels"),
]

BF16, F16 = torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FLEXATTN_BACKEND", "triton")


def _cuda(t):
    return None if t is None else t.cuda()


def run_on_gpu(case: Case, **extra):
    """Our result for `case` (CPU tensors) on the GPU, with poisoned (NaN) output memory: (out, lse, kc, vc)."""
    kc, vc = case.k_cache.cuda(), case.v_cache.cuda()
    cos, sin = case.rotary if case.rotary is not None else (None, None)
    kwargs = {key: _cuda(val) if isinstance(val, torch.Tensor) else val for key, val in case.kwargs.items()}
    torch.cuda.empty_cache()
    # fill the caching allocator's free blocks with NaN: outputs the kernels forget to write stay NaN
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk
    out, lse = flash_attn_with_kvcache(
        case.q.cuda(),
        kc,
        vc,
        _cuda(case.k),
        _cuda(case.v),
        rotary_cos=_cuda(cos),
        rotary_sin=_cuda(sin),
        cache_seqlens=_cuda(case.tensor(case.seqlens)),
        cache_batch_idx=_cuda(case.tensor(case.batch_idx)),
        cache_leftpad=_cuda(case.tensor(case.leftpad)),
        block_table=_cuda(case.block_table),
        return_softmax_lse=True,
        **{**kwargs, **extra},
    )
    return out.cpu(), lse.cpu(), kc.cpu(), vc.cpu()


def check_gpu(case: Case, oracle: tuple, baseline: tuple) -> None:
    """Ours on the GPU against the float64 oracle (and the low-precision baseline) computed on the CPU."""
    out, lse, kc, vc = run_on_gpu(case)
    ref_out, ref_lse, ref_kc, ref_vc = oracle
    if case.q.dtype == torch.float32:
        assert_rel_close("out", out, ref_out, rtol=2e-5)
        assert_rel_close("lse", lse, ref_lse, rtol=2e-5)
    else:
        assert_close_to_oracle("out", out, ref_out, baseline[0])
        assert_close_to_oracle("lse", lse, ref_lse, baseline[1])
    if case.rotary is None:
        assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)
    else:
        torch.testing.assert_close(kc, ref_kc)
        assert torch.equal(vc, ref_vc)


# (name, make_case kwargs): hd 128 GQA 32/8 and the other head layouts, at decode and append lengths
CASES = [
    ("decode_b4_dense_2k", dict(b=4, heads=(32, 8, 8), dims=(128, 128), cache_len=2048, causal=True)),
    ("decode_b2_paged256_5k", dict(b=2, heads=(32, 8, 8), dims=(128, 128), cache_len=5000, page=256)),
    ("decode_b3_paged16_rotary", dict(b=3, heads=(32, 8, 8), dims=(128, 128), cache_len=3000, page=16, rotary_dim=128)),
    ("decode_paged1", dict(b=2, heads=(8, 2, 2), dims=(64, 64), cache_len=700, page=1, causal=True)),
    (
        "decode_paged3_neox",
        dict(
            b=2,
            heads=(16, 4, 4),
            dims=(128, 128),
            cache_len=1000,
            page=3,
            rotary_dim=64,
            rotary_interleaved=False,
            causal=True,
        ),
    ),
    (
        "append7_leftpad_window",
        dict(
            b=3,
            sq=7,
            s_new=7,
            heads=(32, 8, 8),
            dims=(128, 128),
            cache_len=1500,
            leftpad=True,
            window_size=(300, 0),
            rotary_dim=128,
        ),
    ),
    (
        "append16_batch_idx_softcap",
        dict(
            b=2,
            sq=16,
            s_new=16,
            heads=(16, 2, 2),
            dims=(128, 128),
            cache_len=900,
            batch_idx=True,
            softcap=30.0,
            causal=True,
        ),
    ),
    ("hk_ne_hv_dqk_ne_dv", dict(b=2, sq=3, s_new=3, heads=(12, 4, 3), dims=(192, 128), cache_len=1200, causal=True)),
    ("mha_hd256_fp16", dict(b=2, heads=(4, 4, 4), dims=(256, 256), cache_len=800, dtype=F16, causal=True)),
    ("mqa_hd64_long_splits", dict(b=1, heads=(16, 1, 1), dims=(64, 64), cache_len=20000, page=64, s_new=1)),
    ("fp32_gqa", dict(b=2, heads=(8, 2, 2), dims=(64, 64), cache_len=600, dtype=torch.float32, causal=True)),
]


@functools.cache
def _case(name: str) -> tuple[Case, tuple, tuple]:
    """The case, its float64 oracle and low-precision baseline (the oracle loops over slots on the CPU:
    seconds per case, so computed once for the three split counts)."""
    seed = [c[0] for c in CASES].index(name)
    kw = dict(dict(CASES)[name])
    kw.setdefault("dtype", BF16)
    g = torch.Generator().manual_seed(seed)
    case = make_case(seed=seed, **kw)
    if "softcap" in name:
        case.kwargs["sinks"] = torch.randn(case.q.shape[2], generator=g)
    if "window" in name:
        case.kwargs["alibi_slopes"] = torch.rand(case.q.shape[0], case.q.shape[2], generator=g) * 0.01
    baseline = case.oracle(compute_dtype=case.q.dtype) if case.q.dtype != torch.float32 else ()
    return case, case.oracle(), baseline


@pytest.mark.parametrize("num_splits", [0, 1, 7])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_kvcache_gpu(name, num_splits):
    case, oracle, baseline = _case(name)
    case = dataclasses.replace(case, kwargs={**case.kwargs, "num_splits": num_splits})
    check_gpu(case, oracle, baseline)


def test_combine_gpu():
    g = torch.Generator().manual_seed(0)
    out_p = torch.randn(70, 4, 32, 128, generator=g)
    lse_p = torch.randn(70, 4, 32, generator=g) * 4
    lse_p[3, 1] = float("-inf")
    lse_p[:, 2, 5] = float("-inf")
    out_p[3, 1] = float("nan")
    out, lse = torch.ops.flexattn.combine(out_p.cuda(), lse_p.cuda())
    ref_lse = torch.logsumexp(lse_p.double(), 0)
    w = torch.softmax(lse_p.double(), 0).nan_to_num(0.0)
    ref_out = (w[..., None] * out_p.double().nan_to_num(0.0)).sum(0)
    assert_rel_close("out", out.cpu(), ref_out)
    assert_rel_close("lse", lse.cpu(), ref_lse)


# ---------------------------------------------------------------------------------------------
# A compiled decode step under CUDA graphs


class PagedDecoder(torch.nn.Module):
    """Two attention blocks over paged KV caches held in buffers (pages shuffled over a shared pool),
    rotary positions from cache_seqlens: the decode step of a serving engine, in miniature."""

    def __init__(self, batch=4, dim=512, heads=8, kv_heads=2, layers=2, max_len=1024, page=16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        blocks = max_len // page
        n_pages = batch * blocks + 5
        self.layers = torch.nn.ModuleList()
        for i in range(layers):
            layer = torch.nn.Module()
            layer.norm = torch.nn.RMSNorm(dim)
            layer.wq = torch.nn.Linear(dim, dim, bias=False)
            layer.wkv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
            layer.wo = torch.nn.Linear(dim, dim, bias=False)
            self.layers.append(layer)
            self.register_buffer(f"k_cache{i}", torch.randn(n_pages, page, kv_heads, self.head_dim))
            self.register_buffer(f"v_cache{i}", torch.randn(n_pages, page, kv_heads, self.head_dim))
        self.register_buffer("block_table", torch.randperm(n_pages)[: batch * blocks].view(batch, blocks).int())
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.arange(max_len).float()[:, None] * inv[None, :]
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, x: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        for i, layer in enumerate(self.layers):
            h = layer.norm(x)
            q = layer.wq(h).view(b, s, self.heads, self.head_dim)
            k, v = layer.wkv(h).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
            out = flash_attn_with_kvcache(
                q,
                getattr(self, f"k_cache{i}"),
                getattr(self, f"v_cache{i}"),
                k,
                v,
                rotary_cos=self.cos.to(q.dtype),
                rotary_sin=self.sin.to(q.dtype),
                cache_seqlens=cache_seqlens,
                block_table=self.block_table,
                causal=True,
            )
            x = x + layer.wo(out.reshape(b, s, -1))
        return x


def test_compiled_decode_step_cuda_graphs(tmp_path, monkeypatch):
    """mode="reduce-overhead": the step is recorded once as a CUDA graph and replayed; outputs and caches
    match an eager copy of the model step after step, and no cudagraph was skipped."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = PagedDecoder().cuda().to(BF16).eval()
    eager = copy.deepcopy(model)
    for name, buf in model.named_buffers():
        if "cache" in name:
            torch._dynamo.mark_static_address(buf)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    b = 4
    seqlens = torch.tensor([100, 517, 3, 900], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        for t in range(6):
            x = torch.randn(b, 1, 512, device="cuda", dtype=BF16)
            out = step(x, seqlens + t)
            ref = eager(x, seqlens + t)
            torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
            for i in range(2):
                torch.testing.assert_close(
                    getattr(model, f"k_cache{i}"), getattr(eager, f"k_cache{i}"), atol=3e-2, rtol=3e-2
                )
                torch.testing.assert_close(
                    getattr(model, f"v_cache{i}"), getattr(eager, f"v_cache{i}"), atol=3e-2, rtol=3e-2
                )
    torch.cuda.synchronize()
    skips = dict(counters["inductor"])
    print("inductor counters:", {k: v for k, v in skips.items() if "cudagraph" in k})
    assert skips.get("cudagraph_skips", 0) == 0, f"cudagraphs were skipped: {skips}"
    assert math.isfinite(out.float().abs().max().item())
    torch._dynamo.reset()
