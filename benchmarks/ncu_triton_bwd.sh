#!/usr/bin/env bash
# Nsight Compute on the last step's backward kernels: ours in two launches (dK/dV, dQ) beside FlexAttention's
# one, for one shape. Writes $OUT/ncu_bwd_D_S_C.txt (speed of light, warp states, instruction mix, occupancy).
# Usage: bash benchmarks/ncu_triton_bwd.sh HEADDIM SEQLEN CAUSAL
set -uo pipefail
OUT=${OUT:-/tmp}
d=$1 s=$2 c=$3
sections="--section SpeedOfLight --section WarpStateStats --section InstructionStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis"
out="$OUT/ncu_bwd_${d}_${s}_${c}.txt"
{
  echo "== ours, two launches (dK/dV then dQ)"
  ncu --clock-control none $sections -k regex:attn_bwd_kernel --launch-skip 6 --launch-count 2 \
    python3 benchmarks/ncu_triton_bwd.py triton-split "$d" "$s" "$c"
  echo "== FlexAttention"
  ncu --clock-control none $sections -k regex:triton_tem_fused_flex_attention_backward --launch-skip 3 --launch-count 1 \
    python3 benchmarks/ncu_triton_bwd.py flex "$d" "$s" "$c"
} > "$out" 2>&1
grep -E "^==|attn_bwd_kernel|flex_attention_backward|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Thr|Memory Throughput|DRAM Throughput|L2 Hit|Executed Ipc A|Stall|Local" "$out" | head -120
