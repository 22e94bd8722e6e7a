"""The Triton kernels on a CUDA GPU (skipped without one): the DEVELOPERS.md testing grid against the
float64 oracle, forward and backward, plus 100 repeated runs checking bitwise-identical results and
CUDA-graph capture. Run alone (not in the same process as tests/test_triton.py, which turns on
TRITON_INTERPRET); `pytest -n 8` spreads the kernel compiles over CPU cores.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

from flexattn_ops.params import AttnArgs
from tests.triton_cases import Case, attn_args, backward_twice_equal, check_case, make_inputs, run_ours

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs compiled kernels"),
]

BF16, F16 = torch.bfloat16, torch.float16
PAIRS = [(40, 40), (72, 72), (111, 111), (64, 64), (128, 128), (256, 256), (192, 128), (128, 256), (32, 64)]
SEQS = [(1, 1023), (113, 203), (1023, 113), (4224, 4224)]
# feature sets rotated over the grid: every (pair, dtype) meets several, every feature meets every seqlen
FEATURES = [
    {},
    {"causal": True},
    {"window": (100, 30)},
    {"softcap": 30.0, "causal": True},
    {"bias": "full"},
    {"window": (-1, 64), "alibi": "h"},
    {"sinks": True, "causal": True},
    {"dropout_p": 0.1},
]
HEADS = [(4, 4, 4), (4, 2, 2), (4, 1, 1), (4, 2, 1)]  # MHA, GQA, MQA, hk != hv


def _grid():
    cases = []
    for n, (pair, dtype, seqs) in enumerate(itertools.product(PAIRS, (BF16, F16), SEQS)):
        feats = dict(FEATURES[n % len(FEATURES)])
        hq, hk, hv = HEADS[(n // len(FEATURES)) % len(HEADS)]
        sq, sk = seqs
        b = 1 if sq * sk > 1_000_000 else 2
        if feats.pop("bias", None):
            feats["bias"] = (b, hq, sq, sk) if n % 2 else (1, hq, 1, sk)
        layout = ("contiguous", "permuted", "sliced")[n % 3]
        case = Case(b=b, sq=sq, sk=sk, hq=hq, hk=hk, hv=hv, d=pair[0], dv=pair[1], dtype=dtype, layout=layout, **feats)
        cases.append(
            pytest.param(
                case,
                id=f"{pair[0]}x{pair[1]}-{str(dtype)[6:]}-{sq}x{sk}-{hq}.{hk}.{hv}-{layout}-"
                + ("_".join(f"{k}" for k in feats) or "plain"),
            )
        )
    return cases


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FLEXATTN_BACKEND", "triton")
    monkeypatch.setenv("FLEXATTN_TRITON_AUTOTUNE", "0")  # tests use the default tiles: fewer compiles


@pytest.mark.parametrize("case", _grid())
def test_grid_against_oracle(case: Case) -> None:
    check_case(case, "cuda")


@pytest.mark.parametrize(
    "case",
    [
        Case(b=2, sq=1024, sk=1024, hq=8, hk=2, hv=2, d=128, dv=128, dtype=BF16, causal=True),
        Case(
            b=2,
            sq=777,
            sk=1030,
            hq=4,
            hk=2,
            hv=1,
            d=72,
            dv=40,
            dtype=F16,
            bias=(2, 4, 777, 1030),
            sinks=True,
            dropout_p=0.15,
            window=(200, 5),
        ),
    ],
    ids=["gqa_causal_hd128", "everything_hk_ne_hv"],
)
def test_bitwise_identical_100_runs(case: Case) -> None:
    backward_twice_equal(case, "cuda", reps=100)


def test_float32_inputs() -> None:
    check_case(Case(b=2, sq=130, sk=257, hq=2, hk=1, hv=2, d=40, dv=72, causal=True, softcap=10.0), "cuda")


def test_cuda_graph_capture() -> None:
    """fwd + bwd capture into a CUDA graph (no host sync, no data-dependent allocation) and replay equal."""
    c = Case(b=2, sq=256, sk=256, hq=4, hk=2, hv=2, d=64, dv=64, dtype=BF16, causal=True, dropout_p=0.1)
    q, k, v, slopes, bias, sinks, rng, dout = make_inputs(c, "cuda")
    a = attn_args(c, slopes, bias, sinks, rng)
    eager = run_ours(q, k, v, a, dout, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_ours(q, k, v, a, dout, True)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    with torch.cuda.graph(g):
        out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
        grads = torch.autograd.grad(out, [q, k, v], dout)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])
    for x, y in zip(grads, eager[2], strict=True):
        assert torch.equal(x, y)


def test_launch_cache_skips_jit_run_and_tells_alignment_apart(monkeypatch) -> None:
    """triton_launch: a repeated call of the same shapes launches the compiled kernels without JITFunction.run,
    and inputs one element past a 16-byte boundary (which Triton compiles apart) after aligned ones of the same
    shapes get their own kernels: launching the aligned ones on them would fault or read wrong values."""
    from triton.runtime.jit import JITFunction

    c = Case(b=2, sq=200, sk=200, hq=4, hk=2, hv=2, d=64, dv=64, dtype=BF16, causal=True)
    check_case(c, "cuda")
    runs = []
    real_run = JITFunction.run

    def counted_run(self, *args, **kwargs):
        runs.append(self.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted_run)
    check_case(c, "cuda")
    assert runs == []
    check_case(dataclasses.replace(c, layout="misaligned"), "cuda")
    assert "attn_fwd_kernel" in runs and "attn_bwd_kernel" in runs


# ---------------------------------------------------------------------------------------------
# Varlen: packed and paged keys (flexattn_ops.testing.varlen_attention_ref is the oracle)

# Mixed lengths around the 64/128-row tiles (0, 1, 129, 517 ...); keys >= queries per sequence.
LENS_Q = [1, 0, 300, 129, 1000, 64, 517]
LENS_K = [1, 5, 300, 200, 1000, 64, 600]


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def _varlen_inputs(dtype, heads, dims, page: int, pad: int, seed: int):
    """q (total_q + pad, hq, dqk) and packed or paged (shuffled pages, spares) k/v, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    (hq, hk, hv), (dqk, dv) = heads, dims

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device="cuda", dtype=dtype)

    q = t(sum(LENS_Q) + pad, hq, dqk)
    if not page:
        return q, t(sum(LENS_K), hk, dqk), t(sum(LENS_K), hv, dv), None
    blocks = -(-max(LENS_K) // page)
    pool = len(LENS_K) * blocks + 3
    table = torch.randperm(pool, generator=g)[: len(LENS_K) * blocks].view(len(LENS_K), blocks)
    return q, t(pool, page, hk, dqk), t(pool, page, hv, dv), table.to(device="cuda", dtype=torch.int32)


def check_varlen_gpu(dtype, heads, dims, kwargs: dict, page: int = 0, used=None, pad: int = 0, seed: int = 0):
    """out, lse, dq, dk, dv (and dsink) of the Triton varlen path against the per-sequence float64 oracle."""
    from flexattn_ops.testing import assert_close_to_oracle, paged_to_packed, varlen_attention_ref

    q, k, v, table = _varlen_inputs(dtype, heads, dims, page, pad, seed)
    cu_q, cu_k = _cu(LENS_Q), _cu(LENS_K)
    seqused = torch.tensor(used, dtype=torch.int32, device="cuda") if used is not None else None
    slopes = kwargs.get("alibi_slopes")
    sinks = kwargs.get("sinks")
    left, right = kwargs.get("window_size", (-1, -1))
    a = AttnArgs(
        cu_q,
        cu_k,
        seqused,
        table,
        max(LENS_Q),
        max(LENS_K),
        dims[0] ** -0.5,
        left,
        0 if kwargs.get("causal") else right,
        kwargs.get("softcap", 0.0),
        slopes,
        None,
        sinks,
    )
    leaves = [x for x in (q, k, v, sinks) if x is not None]
    for x in leaves:
        x.requires_grad_(True)
    out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)

    def oracle(compute_dtype):
        kk = paged_to_packed(k, table, LENS_K) if table is not None else k
        vv = paged_to_packed(v, table, LENS_K) if table is not None else v
        scale = dims[0] ** -0.5
        o, s = varlen_attention_ref(
            q, kk, vv, cu_q, cu_k, seqused_k=seqused, softmax_scale=scale, compute_dtype=compute_dtype, **kwargs
        )
        return o, s, torch.autograd.grad(o, leaves, dout.to(o.dtype), allow_unused=True)

    ref, base = oracle(torch.float64), oracle(dtype)
    assert_close_to_oracle("out", out, ref[0], base[0], atol=1e-3)
    assert_close_to_oracle("lse", lse, ref[1], base[1].float(), atol=1e-3)
    for name, ours, r, b in zip(("dq", "dk", "dv", "dsink"), grads, ref[2], base[2], strict=False):
        atol = 1e-2 * (sum(LENS_Q) if name == "dsink" else 1)
        assert_close_to_oracle(name, ours, torch.zeros_like(ours) if r is None else r, b, atol=atol)
    if pad:
        assert (out[sum(LENS_Q) :] == 0).all() and torch.isneginf(lse[:, sum(LENS_Q) :]).all()
        assert (grads[0][sum(LENS_Q) :] == 0).all()


def test_varlen_packed_gqa_causal_hd128() -> None:
    check_varlen_gpu(BF16, (8, 2, 2), (128, 128), {"causal": True})


def test_varlen_packed_everything_padding() -> None:
    """hk != hv, dqk != dv, window + softcap + per-sequence ALiBi, padding tokens past cu_seqlens_q[-1]."""
    slopes = torch.rand(len(LENS_Q), 4, device="cuda") * 0.1
    kwargs = {"window_size": (100, 20), "softcap": 20.0, "alibi_slopes": slopes}
    check_varlen_gpu(F16, (4, 2, 1), (72, 40), kwargs, pad=77)


@pytest.mark.parametrize("page", [1, 16, 64, 256])
def test_varlen_paged(page: int) -> None:
    """Pages of 1 and 16 take the per-key page lookup; 64 and 256 the per-tile one in every kernel whose
    BLOCK_N divides them (hd128 tiles have BLOCK_N 64 or 128)."""
    check_varlen_gpu(BF16, (8, 2, 2), (128, 128), {"causal": True}, page=page, seed=page)


def test_varlen_paged_seqused_sinks() -> None:
    sinks = torch.randn(4, device="cuda")
    check_varlen_gpu(BF16, (4, 4, 4), (64, 64), {"sinks": sinks}, page=3, used=[1, 3, 250, 200, 999, 0, 600])


def test_varlen_dropout_matches_reference_backend(monkeypatch) -> None:
    """float32 varlen dropout: the reference backend on the GPU draws the same mask."""
    q, k, v, table = _varlen_inputs(torch.float32, (4, 2, 2), (64, 64), 16, 5, seed=3)
    rng = torch.tensor([99, 7], dtype=torch.int64, device="cuda")
    a = AttnArgs(_cu(LENS_Q), _cu(LENS_K), None, table, max(LENS_Q), max(LENS_K), 0.125, -1, 0)
    a = a._replace(dropout_p=0.2, rng_state=rng)
    dout = torch.randn(*q.shape[:-1], 64, device="cuda")

    def run():
        for x in (q, k, v):
            x.requires_grad_(True)
        out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    ours = run()
    monkeypatch.setenv("FLEXATTN_BACKEND", "reference")
    for x, y in zip(ours, run(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_varlen_cuda_graph_capture() -> None:
    """Paged varlen fwd + bwd capture into a CUDA graph (no host read of cu_seqlens) and replay equal."""
    q, k, v, table = _varlen_inputs(BF16, (4, 2, 2), (64, 64), 16, 3, seed=4)
    a = AttnArgs(_cu(LENS_Q), _cu(LENS_K), None, table, max(LENS_Q), max(LENS_K), 0.125, -1, 0)
    dout = torch.randn(*q.shape[:-1], 64, device="cuda", dtype=BF16)
    for x in (q, k, v):
        x.requires_grad_(True)

    def step():
        out, lse = torch.ops.flexattn.fwd(q, k, v, *a)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        # detached: a live autograd graph keeps its AccumulateGrad nodes on the eager stream, and
        # backward under capture would then sync the capturing stream with it (capture error)
        return (out.detach(), lse, *grads)

    eager = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = step()
    g.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, eager, strict=True):
        assert torch.equal(x, y)
