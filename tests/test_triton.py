"""The Triton kernels under TRITON_INTERPRET=1 on small CPU tensors: every feature against the oracle.

tests/conftest.py turns TRITON_INTERPRET on for CUDA-less machines before anything imports Triton;
on a GPU machine these tests skip and tests/test_triton_gpu.py runs the compiled kernels. Outputs are
poisoned: torch fills uninitialised memory with NaN under deterministic algorithms, so an element a
kernel forgets to write shows up as NaN. Shapes are tiny (the interpreter runs ~1000x slower than
compiled code) and odd (1, 17, 33, 113; head dims 40, 72, 111) so every masked tile path runs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flexattn_ops.triton_common import load_rows  # noqa: E402
from flexattn_ops.triton_tuning import pad_dim  # noqa: E402
from tests.triton_cases import Case, backward_twice_equal, check_case  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("triton_backend_poisoned"),
]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


CASES = {
    "plain_f32": Case(),
    "plain_bf16_odd": Case(dtype=BF16, sq=33, sk=17, d=40, dv=40),
    "f16_hd72": Case(dtype=F16, sq=19, sk=29, d=72, dv=72, b=1),
    "causal_sq_lt_sk": Case(causal=True, sq=17, sk=40),
    "causal_sq_gt_sk_masked_rows": Case(causal=True, sq=40, sk=17, b=1),
    "window": Case(window=(5, 3), sq=40, sk=45),
    "window_left_only": Case(window=(7, -1), sq=33, sk=33),
    "window_right_only_neg_off": Case(window=(-1, 2), sq=45, sk=20, b=1),
    "softcap": Case(softcap=3.0, scale=0.5, dtype=BF16),
    "alibi_h_causal": Case(alibi="h", causal=True, sq=20, sk=35),
    "alibi_bh": Case(alibi="bh", sq=1, sk=33),
    "bias_full": Case(bias=(2, 2, 17, 33)),
    "bias_broadcast_b_h": Case(bias=(1, 1, 17, 33), causal=True),
    "bias_2d_rows": Case(bias=(17, 1)),
    "bias_3d_bf16": Case(bias=(2, 1, 33), dtype=BF16),
    "bias_no_grad": Case(bias=(1, 2, 17, 33), bias_grad=False),
    "sinks": Case(sinks=True, sq=20, sk=24),
    "sinks_causal_masked_rows": Case(sinks=True, causal=True, sq=30, sk=12, b=1),
    "dropout": Case(dropout_p=0.3, sq=20, sk=37),
    "dropout_causal_bf16": Case(dropout_p=0.17, causal=True, dtype=BF16, sq=24, sk=24),
    "gqa": Case(hq=4, hk=2, hv=2),
    "mqa": Case(hq=4, hk=1, hv=1, causal=True),
    "hk_ne_hv": Case(hq=4, hk=2, hv=1, d=24, dv=40),
    "dqk_ne_dv_111_40": Case(d=111, dv=40, b=1, sq=13, sk=21),
    "dqk_192_dv_128": Case(d=192, dv=128, b=1, hq=1, hk=1, hv=1, sq=9, sk=18),
    "dqk_32_dv_64_bf16": Case(d=32, dv=64, dtype=BF16),
    "tiny_dims_8": Case(d=8, dv=8, sq=1, sk=1),
    "long_113": Case(b=1, hq=1, hk=1, hv=1, sq=113, sk=70, causal=True, d=16, dv=16),
    # windows whose key tiles have masked query tiles on both sides of 2+ unmasked ones (16x16 interpreter
    # tiles): the dK/dV loop's jump over the unmasked tiles must land on the right tile
    "window_wide_both_sides": Case(b=1, hq=1, hk=1, hv=1, sq=97, sk=97, window=(50, 3), d=16, dv=16),
    "window_wide_left_sq_gt_sk": Case(b=1, hq=1, hk=1, hv=1, sq=90, sk=75, window=(50, 0), d=16, dv=16),
    "permuted": Case(layout="permuted", causal=True, bias=(2, 2, 17, 33)),
    "sliced": Case(layout="sliced", hq=2, hk=1, hv=2, window=(4, 4)),
    "everything": Case(
        hq=4,
        hk=2,
        hv=1,
        d=40,
        dv=24,
        window=(9, 2),
        softcap=5.0,
        alibi="bh",
        bias=(2, 1, 17, 33),
        sinks=True,
        dropout_p=0.2,
        layout="permuted",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_against_oracle(name: str) -> None:
    check_case(CASES[name], "cpu")


def test_deterministic_bitwise() -> None:
    backward_twice_equal(
        Case(hq=4, hk=1, hv=2, causal=True, bias=(1, 4, 17, 33), dropout_p=0.1, deterministic=True), "cpu"
    )


@pytest.mark.parametrize(
    "c",
    [
        Case(hq=4, hk=2, hv=2, causal=True, sq=40, sk=33),
        Case(hq=4, hk=2, hv=1, d=24, dv=40, bias=(1, 4, 17, 33)),
        Case(hq=3, hk=1, hv=1, window=(9, 4), sq=37, sk=50),
    ],
    ids=["gqa_causal", "hk_ne_hv_dbias", "mqa_window"],
)
def test_one_launch_backward_equals_two(c: Case, monkeypatch) -> None:
    """The dK/dV and dQ programs in one launch ("both") and in two give bitwise the same gradients (dbias
    included) and match the reference, with unlike tiles for the two parts, as a GPU's tuned table has."""
    from flexattn_ops import reference, triton_backend
    from tests.triton_cases import attn_args, make_inputs

    tiles = {"dkdv": {"BLOCK_M": 16, "BLOCK_N": 32}, "dq": {"BLOCK_M": 32, "BLOCK_N": 16}}
    one_launch = {"one_launch": 1}
    real_config, real_kernel = triton_backend.tuning.get_config, triton_backend.attn_bwd_kernel

    def get_config(kernel, *args):
        if kernel == "bwd":
            return one_launch
        return {**tiles[kernel], "num_warps": 1, "num_stages": 1} if kernel in tiles else real_config(kernel, *args)

    parts = []

    class RecordParts:  # attn_bwd_kernel[grid](...), noting which PART each launch runs
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                parts.append(kwargs["PART"])
                return real_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_backend.tuning, "get_config", get_config)
    monkeypatch.setattr(triton_backend, "attn_bwd_kernel", RecordParts())
    monkeypatch.setattr(triton_backend, "_plans", {})  # plans made here hold RecordParts and a forced choice
    q, k, v, slopes, bias, sinks, rng, dout = make_inputs(c, "cpu")
    a = attn_args(c, slopes, bias, sinks, rng)
    out, lse = (t.detach() for t in torch.ops.flexattn.fwd(q, k, v, *a))
    one = torch.ops.flexattn.bwd(dout, q, k, v, out, lse, *a, bias is not None)
    one_launch["one_launch"] = 0
    triton_backend._plans.clear()  # the choice changed under an unchanged signature
    two = torch.ops.flexattn.bwd(dout, q, k, v, out, lse, *a, bias is not None)
    assert parts == ["both", "dq", "dkdv"]
    ref = reference.bwd(dout, q, k, v, out, lse, a, bias is not None)
    for x, y, r in zip(one[:4], two[:4], ref[:4], strict=True):
        if r is None:
            continue
        assert torch.equal(x, y)
        torch.testing.assert_close(x, r, atol=1e-4, rtol=1e-4)


def test_probs_match_reference_and_dropout_mask() -> None:
    from flexattn_ops import reference
    from tests.triton_cases import attn_args, dropout_mask, make_inputs

    c = Case(dropout_p=0.25, window=(6, 1), softcap=4.0, alibi="h", bias=(1, 2, 17, 33), sinks=True)
    q, k, v, slopes, bias, sinks, rng, _ = make_inputs(c, "cpu")
    a = attn_args(c, slopes, bias, sinks, rng)
    p = torch.ops.flexattn.probs(q, k, v, *a)
    p_ref = reference.probs(q, k, v, a)
    torch.testing.assert_close(p.abs(), p_ref.abs(), atol=1e-6, rtol=1e-5)
    keep = dropout_mask(c, rng)
    assert torch.equal(p < 0, (~keep) & (p_ref.abs() > 0))


def test_unsupported_reasons() -> None:
    from flexattn_ops import triton_backend
    from flexattn_ops.params import AttnArgs

    q = torch.randn(1, 4, 1, 16)
    assert triton_backend.unsupported("fwd", q, q, q, AttnArgs()) is None
    big = torch.randn(1, 4, 1, 300)
    assert "head dim" in triton_backend.unsupported("fwd", big, big, big, AttnArgs())
    cu = torch.tensor([0, 4], dtype=torch.int32)
    assert triton_backend.unsupported("bwd", q[0], q[0], q[0], AttnArgs(cu_seqlens_q=cu, cu_seqlens_k=cu)) is None
    assert triton_backend.unsupported("fwd", q.double(), q.double(), q.double(), AttnArgs()) is not None


def test_tuning_cache_roundtrip(tmp_path, monkeypatch) -> None:
    from flexattn_ops import triton_tuning

    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    triton_tuning._save_disk("k1", {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    assert triton_tuning._load_disk()["k1"]["BLOCK_N"] == 32
    assert triton_tuning.get_config("fwd", torch.device("cpu"), F32, 40, 72, False) == triton_tuning.INTERPRET_CONFIG
    assert len(triton_tuning.candidates("fwd", BF16, 128, 128)) >= 4


def test_tuning_cache_file_read_once(tmp_path, monkeypatch) -> None:
    """A configuration nobody can tune (autotuning off) falls back to the cache file on every call: the file
    is read once a process, and a save keeps what another process wrote meanwhile."""
    from pathlib import Path

    from flexattn_ops import triton_tuning

    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(triton_tuning, "_disk", {})
    cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    (tmp_path / "triton_tuning.json").write_text(json.dumps({"k1": cfg}))
    reads = []
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **kw: reads.append(self) or real_read(self, *a, **kw))
    for _ in range(3):
        assert triton_tuning._load_disk()["k1"] == cfg
    assert len(reads) == 1
    (tmp_path / "triton_tuning.json").write_text(json.dumps({"k1": cfg, "k2": cfg}))  # another process
    triton_tuning._save_disk("k3", cfg)
    on_disk = json.loads(real_read(tmp_path / "triton_tuning.json"))
    assert set(triton_tuning._load_disk()) == {"k1", "k2", "k3"} == set(on_disk)


@pytest.mark.parametrize(
    "value,retuned",
    [("", set()), ("1", {"fwd", "dkdv", "dq", "bwd"}), ("dkdv,dq,bwd", {"dkdv", "dq", "bwd"}), ("fwd", {"fwd"})],
)
def test_retune_env_selects_kinds(value: str, retuned: set, monkeypatch) -> None:
    from flexattn_ops import triton_tuning

    monkeypatch.setenv("FLEXATTN_TRITON_RETUNE", value)
    assert {k for k in ("fwd", "dkdv", "dq", "bwd") if triton_tuning.retunes(k)} == retuned


@triton.jit
def _load_rows_kernel(Buf, Out, n, stride, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    tile = load_rows(Buf, rows, n, stride, offs_d, D, BLOCK_D)
    tl.store(Out + rows[:, None] * BLOCK_D + offs_d[None, :], tile)


@pytest.mark.parametrize("d", [16, 24])
@pytest.mark.parametrize("n", [1, 5, 16])
def test_load_rows_reads_only_rows_below_n(n: int, d: int) -> None:
    """Resident tiles (Q in the forward; K/V, Q/dO in the backward) of the last, partial tile: rows past n repeat
    row n - 1 with an unpadded head dim and are zero with a padded one, and nothing outside rows [0, n) is read.
    The memory around the n valid rows holds NaN, so a read past the end (a missing or wrong clamp) shows up;
    the oracle tests cannot see one, since those rows never reach a result."""
    block_d, rows = pad_dim(d), 16
    buf = torch.full((2 + n + rows, d), float("nan"))
    valid = torch.randn(n, d)
    buf[2 : 2 + n] = valid
    out = torch.full((rows, block_d), float("nan"))
    _load_rows_kernel[(1,)](buf[2:], out, n, d, D=d, BLOCK_D=block_d, ROWS=rows)
    assert not out.isnan().any()
    assert torch.equal(out[:n, :d], valid)
    past = valid[n - 1].expand(rows - n, d) if d == block_d else torch.zeros(rows - n, d)
    assert torch.equal(out[n:, :d], past)
    assert not out[:, d:].any()


# Cases of one shape that differ in one thing each that a plan depends on (triton_backend._signature): run in
# turn, each after the others' plans are kept, a field missing from the signature would replay a wrong plan.
PLAN_CASES = [
    Case(),
    Case(scale=0.05),
    Case(causal=True),
    Case(window=(5, 2)),
    Case(softcap=3.0),
    Case(alibi="h"),
    Case(alibi="bh"),
    Case(bias=(1, 2, 17, 33)),
    Case(bias=(2, 1, 1, 33)),
    Case(bias=(1, 2, 17, 33), bias_grad=False),
    Case(sinks=True),
    Case(dropout_p=0.2),
    Case(layout="permuted"),
    Case(layout="sliced"),
    Case(hk=1, hv=1),
    Case(hk=1, hv=2),
]


def test_plans_kept_per_signature(monkeypatch) -> None:
    """Every case of PLAN_CASES matches the oracle both times it runs, the second time from kept plans."""
    from flexattn_ops import triton_backend

    monkeypatch.setattr(triton_backend, "_plans", {})
    for c in PLAN_CASES:
        check_case(c, "cpu")
    kept = len(triton_backend._plans)
    # a fwd and a bwd plan each, but for one forward: bias_grad changes the backward only
    assert kept == 2 * len(PLAN_CASES) - 1
    for c in PLAN_CASES:
        check_case(c, "cpu")
    assert len(triton_backend._plans) == kept


@pytest.mark.parametrize("settled", [True, False])
def test_plan_made_once_and_kept_only_when_settled(settled: bool, monkeypatch) -> None:
    """A repeated call replays the kept plan (no second assembly, no get_config); a call whose configuration
    may still change (autotuning not allowed yet) assembles anew every time."""
    from flexattn_ops import triton_backend
    from tests.triton_cases import attn_args, make_inputs

    monkeypatch.setattr(triton_backend, "_plans", {})
    monkeypatch.setattr(triton_backend.tuning, "settled", lambda *args: settled)
    made = {"fwd": 0, "bwd": 0}
    for name in made:
        build = getattr(triton_backend, f"_{name}_plan")

        def counted(*args, name=name, build=build):
            made[name] += 1
            return build(*args)

        monkeypatch.setattr(triton_backend, f"_{name}_plan", counted)
    c = Case(causal=True)
    q, k, v, slopes, bias, sinks, rng, dout = make_inputs(c, "cpu")
    a = attn_args(c, slopes, bias, sinks, rng)
    results = []
    for _ in range(3):
        out, lse = triton_backend.fwd(q, k, v, a)
        results.append((out, lse, *triton_backend.bwd(dout, q, k, v, out, lse, a, False)[:3]))
    assert made == ({"fwd": 1, "bwd": 1} if settled else {"fwd": 3, "bwd": 3})
    for x, y in zip(results[0], results[2], strict=True):
        assert torch.equal(x, y)
