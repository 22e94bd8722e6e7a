"""The Triton kernels on a CUDA GPU (skipped without one): the DEVELOPERS.md testing grid against the
float64 oracle, forward and backward, plus 100 repeated runs checking bitwise-identical results and
CUDA-graph capture. Run alone (not in the same process as tests/test_triton.py, which turns on
TRITON_INTERPRET); `pytest -n 8` spreads the kernel compiles over CPU cores.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

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
