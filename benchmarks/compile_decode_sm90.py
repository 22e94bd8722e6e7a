"""Compile the decode kernels for an H100 (sm_90) without a GPU and report what the PTX holds.

Triton lowers to PTX and cubin with its bundled ptxas, no driver needed, so the main questions about the
decode kernel can be answered at no device time: does every variant compile for sm_90, are the K/V tile
loads 16-byte `cp.async` copies (software-pipelined through shared memory) rather than scalar loads, and
how much shared memory does a program take (which bounds programs per SM). Pointers and strides are
marked divisible by 16, as the JIT's specialisation marks them at run time for realistic shapes.

Usage: python benchmarks/compile_decode_sm90.py   (run without TRITON_INTERPRET)
"""

from __future__ import annotations

import collections
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flexattn_ops import triton_decode as td  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTRS = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "Knew": "*bf16", "Vnew": "*bf16", "Out": "*bf16", "Lse": "*fp32",
    "Cos": "*bf16", "Sin": "*bf16", "Seqlens": "*i32", "BatchIdx": "*i32", "Leftpad": "*i32", "BlockTable": "*i32",
    "Alibi": "*fp32", "Sinks": "*fp32",
}  # fmt: skip
# strides that are multiples of 16 elements for realistic shapes (hd 128, 8 kv heads)
DIV16 = {"stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs",
         "stride_vh", "stride_knb", "stride_kns", "stride_knh", "stride_vnb", "stride_vns", "stride_vnh",
         "stride_osp", "stride_ob", "stride_os", "stride_oh", "stride_ro"}  # fmt: skip
BASE = dict(
    G=4, DQK=128, DV=128, BLOCK_M=16, BLOCK_N=64, BLOCK_DQK=128, BLOCK_DV=128, PAGED=False, PAGE_TILES=False,
    SAME_SLOTS=True, HAS_SEQLENS=False, HAS_BATCH_IDX=False, HAS_LEFTPAD=False, HAS_NEW=False, HAS_ROTARY=False,
    INTERLEAVED=True, ROTARY_LOCAL=False, HAS_LEFT=False, HAS_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False,
    FOLD_SINKS=False, PRECISION="tf32",
)  # fmt: skip
VARIANTS = {
    "decode contiguous": {},
    "decode paged 256 (one page lookup a tile)": dict(PAGED=True, PAGE_TILES=True, HAS_SEQLENS=True),
    "decode paged 16 (lookup per slot)": dict(PAGED=True, HAS_SEQLENS=True),
    "append + rotary + leftpad + window + alibi + softcap + sinks": dict(
        HAS_SEQLENS=True,
        HAS_NEW=True,
        HAS_ROTARY=True,
        HAS_LEFTPAD=True,
        ROTARY_LOCAL=True,
        HAS_LEFT=True,
        HAS_RIGHT=True,
        HAS_ALIBI=True,
        HAS_SOFTCAP=True,
        FOLD_SINKS=True,
    ),  # fmt: skip
    "hd 256": dict(DQK=256, DV=256, BLOCK_DQK=256, BLOCK_DV=256, BLOCK_N=32),
}


def compile_kernel(fn, ptrs: dict, constexprs: dict, div16: set, floats: tuple, options: dict):
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in floats else "i32"
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


def summary(kernel) -> str:
    ptx = kernel.asm["ptx"]
    found = collections.Counter(re.findall(r"(ld\.global[.a-z0-9]*|cp\.async\.c[ag][.a-z]*|mma\.sync[.a-z0-9]*)", ptx))
    return f"shared {kernel.metadata.shared} B; " + ", ".join(f"{k} x{v}" for k, v in sorted(found.items()))


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90")
    for name, change in VARIANTS.items():
        for stages in (2, 3):
            cfg = {**BASE, **change}
            k = compile_kernel(td.kvcache_fwd_kernel, PTRS, cfg, DIV16, ("sm_scale", "softcap"),
                               {"num_warps": 4, "num_stages": stages})  # fmt: skip
            print(f"{name}, {stages} stages: {summary(k)}", flush=True)
    ptrs = {"OutP": "*fp32", "LseP": "*fp32", "Out": "*bf16", "Lse": "*fp32", "Sinks": "*fp32"}
    k = compile_kernel(td.combine_kernel, ptrs, dict(DV=128, BLOCK_S=64, BLOCK_DV=128, HAS_SINKS=True),
                       {"stride_ps", "stride_p0"}, (), {"num_warps": 4})  # fmt: skip
    print(f"combine: {summary(k)}")


if __name__ == "__main__":
    main()
