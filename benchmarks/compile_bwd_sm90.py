"""Compile the Triton backward (attn_bwd_kernel) for an H100 (sm_90a) without a GPU and report each part's
footprint: registers and spills (the system ptxas on Triton's PTX), and shared memory. That tells whether
the one-launch part ("both") costs registers or shared memory beyond the larger of its two parts, which
decides how many programs an SM holds.

Usage: python benchmarks/compile_bwd_sm90.py [--dims 128x128] [--causal 0|1]  (needs `ptxas` on PATH;
the tiles are the tuned table's H100 entries for seqlen 512)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from compile_decode_sm90 import compile_kernel  # noqa: E402

from flexattn_ops import triton_bwd  # noqa: E402
from flexattn_ops.triton_configs import TUNED  # noqa: E402

PTRS = {n: "*bf16" for n in ("Q", "K", "V", "DO", "DQ", "DK", "DV_out", "Bias", "Alibi")}
PTRS.update({n: "*fp32" for n in ("Lse", "Delta", "DBias")})
PTRS.update({n: "*i32" for n in ("CuQ", "CuK", "SeqUsed", "Table")})
PTRS["Rng"] = "*i64"
FLOATS = ("sm_scale", "softcap", "drop_rescale")


def ptxas_footprint(kernel) -> str:
    """Registers and spill bytes from the system ptxas (Triton's bundled one may not run here)."""
    ptx = re.sub(r"\.version \d+\.\d+", ".version 8.0", kernel.asm["ptx"])
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run(["ptxas", "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
    if regs is None:
        return "ptxas: " + out.stderr.strip().splitlines()[-1]
    return f"{regs.group(1)} registers, spills {spills.group(1) if spills else '?'} B"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="128x128")
    ap.add_argument("--causal", type=int, default=0)
    args = ap.parse_args()
    dqk, dv = (int(x) for x in args.dims.split("x"))
    key = f"NVIDIA_H100_80GB_HBM3|triton3.6.0|bfloat16|{dqk}x{dv}|{'causal' if args.causal else 'full'}|short"
    kv, dq = TUNED["dkdv|" + key], TUNED["dq|" + key]
    base = dict(
        DQK=dqk, DV=dv, DKDV_BLOCK_M=kv["BLOCK_M"], DKDV_BLOCK_N=kv["BLOCK_N"], DQ_BLOCK_M=dq["BLOCK_M"],
        DQ_BLOCK_N=dq["BLOCK_N"], BLOCK_DQK=dqk, BLOCK_DV=dv, HAS_LEFT=False, HAS_RIGHT=bool(args.causal),
        HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_BIAS=False, HAS_DBIAS=False, HAS_DROPOUT=False, PRECISION="tf32",
        VARLEN=False, PAGED=False, HAS_SEQUSED=False, PAGE_TILE_ALIGNED=False,
    )  # fmt: skip
    strides = {a for a in triton_bwd.attn_bwd_kernel.arg_names if a.startswith("stride_") and a != "stride_ab"}
    print(f"dims {dqk}x{dv} causal={args.causal}: dkdv {kv}, dq {dq}")
    for part, cfg in (("dkdv", kv), ("dq", dq), ("both", kv)):
        for varlen in (False, True) if part != "both" else (False,):
            consts = {**base, "PART": part, "VARLEN": varlen, "HAS_SEQUSED": varlen}
            opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            k = compile_kernel(triton_bwd.attn_bwd_kernel, PTRS, consts, strides, FLOATS, opts)
            print(f"  {part:5s} varlen={int(varlen)}: shared {k.metadata.shared} B, {ptxas_footprint(k)}", flush=True)


if __name__ == "__main__":
    main()
