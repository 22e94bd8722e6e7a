"""Compile the Triton backward (attn_bwd_kernel) for an H100 (sm_90a) without a GPU and report each part's
footprint: registers and spills (the system ptxas on Triton's PTX), and shared memory. That tells whether
the one-launch part ("both") costs registers or shared memory beyond the larger of its two parts, which
decides how many programs an SM holds. With --loops, each branch-target region of the SASS (Triton's bundled
nvdisasm) with its local loads/stores (spills) and HGMMAs, so a spill can be placed inside or outside the
query/key-tile loops (the loops are the regions with HGMMAs).

Usage: python benchmarks/compile_bwd_sm90.py [--dims 128x128] [--causal 0|1] [--long] [--tile 64x128:8:3]
       [--loops]   (needs `ptxas` on PATH; the tiles are the tuned table's H100 entries for seqlen 512, or for
       long sequences with --long; --tile overrides the dK/dV part's and prints only that part)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from compile_decode_sm90 import compile_kernel  # noqa: E402

from flexattn_ops import triton_bwd  # noqa: E402
from flexattn_ops.triton_configs import TUNED  # noqa: E402

PTRS = {n: "*bf16" for n in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV_out", "Bias", "Alibi")}
PTRS.update({n: "*fp32" for n in ("Lse", "Delta", "DBias")})
PTRS.update({n: "*i32" for n in ("CuQ", "CuK", "SeqUsed", "Table")})
PTRS["Rng"] = "*i64"
FLOATS = ("sm_scale", "softcap", "drop_rescale")


def ptxas_footprint(kernel, loops: bool = False) -> str:
    """Registers and spill bytes from the system ptxas (Triton's bundled one may not run here); with `loops`,
    also a line per SASS region (between branch targets): instructions, LDL, STL and HGMMA counts."""
    ptx = re.sub(r"\.version \d+\.\d+", ".version 8.0", kernel.asm["ptx"])
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(["ptxas", "-arch=sm_90a", "-v", src, "-o", cubin], capture_output=True, text=True)
        regs = re.search(r"Used (\d+) registers", out.stderr)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)
        if regs is None:
            return "ptxas: " + out.stderr.strip().splitlines()[-1]
        text = f"{regs.group(1)} registers, spills {spills.group(1) if spills else '?'} B"
        if loops:
            nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
            sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True).stdout
            text += "".join(f"\n      {line}" for line in sass_regions(sass))
    return text


def sass_regions(sass: str) -> list[str]:
    """One line per region between branch-target labels (.L_x_N) of a disassembly."""
    regions: list[list] = [["entry", 0, 0, 0, 0]]
    for line in sass.splitlines():
        if re.match(r"^\.L_x_\d+:", line):
            regions.append([line.rstrip(":"), 0, 0, 0, 0])
        elif re.search(r"/\*[0-9a-f]{4,}\*/", line):
            r = regions[-1]
            r[1] += 1
            r[2] += "LDL" in line
            r[3] += "STL" in line
            r[4] += "HGMMA" in line
    return [
        f"{lab:8s} {n:5d} instr, {ldl:3d} LDL, {stl:3d} STL, {mma:3d} HGMMA" for lab, n, ldl, stl, mma in regions if n
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="128x128")
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--long", action="store_true", help="the long-sequence tiles instead of seqlen 512's")
    ap.add_argument("--tile", default="", help="dK/dV tile BLOCK_MxBLOCK_N:warps:stages (only that part)")
    ap.add_argument("--loops", action="store_true", help="SASS regions with their spills and HGMMAs")
    args = ap.parse_args()
    dqk, dv = (int(x) for x in args.dims.split("x"))
    key = f"NVIDIA_H100_80GB_HBM3|triton3.6.0|bfloat16|{dqk}x{dv}|{'causal' if args.causal else 'full'}"
    key += "" if args.long else "|short"
    kv, dq = TUNED["dkdv|" + key], TUNED["dq|" + key]
    parts = [("dkdv", kv), ("dq", dq), ("both", kv)]
    if args.tile:
        tile, w, st = args.tile.split(":")
        m, n = (int(x) for x in tile.split("x"))
        kv = {"BLOCK_M": m, "BLOCK_N": n, "num_warps": int(w), "num_stages": int(st)}
        parts = [("dkdv", kv)]
    base = dict(
        DQK=dqk, DV=dv, DKDV_BLOCK_M=kv["BLOCK_M"], DKDV_BLOCK_N=kv["BLOCK_N"], DQ_BLOCK_M=dq["BLOCK_M"],
        DQ_BLOCK_N=dq["BLOCK_N"], BLOCK_DQK=dqk, BLOCK_DV=dv, HAS_LEFT=False, HAS_RIGHT=bool(args.causal),
        HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_BIAS=False, HAS_DBIAS=False, HAS_DROPOUT=False, PRECISION="tf32",
        VARLEN=False, PAGED=False, HAS_SEQUSED=False, PAGE_TILE_ALIGNED=False,
    )  # fmt: skip
    strides = {a for a in triton_bwd.attn_bwd_kernel.arg_names if a.startswith("stride_") and a != "stride_ab"}
    print(f"dims {dqk}x{dv} causal={args.causal}: dkdv {kv}, dq {dq}")
    for part, cfg in parts:
        for varlen in (False, True) if part != "both" else (False,):
            consts = {**base, "PART": part, "VARLEN": varlen, "HAS_SEQUSED": varlen}
            opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            k = compile_kernel(triton_bwd.attn_bwd_kernel, PTRS, consts, strides, FLOATS, opts)
            fp = ptxas_footprint(k, args.loops)
            print(f"  {part:5s} varlen={int(varlen)}: shared {k.metadata.shared} B, {fp}", flush=True)


if __name__ == "__main__":
    main()
