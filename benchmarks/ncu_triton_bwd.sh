#!/usr/bin/env bash
# Nsight Compute on the last step's backward kernels: ours in two launches (dK/dV, dQ) beside FlexAttention's
# one, for one shape. Writes $OUT/ncu_bwd_D_S_C.txt (speed of light, warp states, instruction mix, occupancy);
# with SOURCE=1 also $OUT/ncu_regions_D_S_C.txt: each kernel's stall samples before, in, between and after its
# loops (benchmarks/ncu_sass_regions.py on the SASS source page).
# Usage: [SOURCE=1] bash benchmarks/ncu_triton_bwd.sh HEADDIM SEQLEN CAUSAL
set -uo pipefail
OUT=${OUT:-/tmp}
d=$1 s=$2 c=$3
sections="--section SpeedOfLight --section WarpStateStats --section InstructionStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis"
if [ "${SOURCE:-0}" = 1 ]; then sections="$sections --section SourceCounters --import-source yes"; fi
out="$OUT/ncu_bwd_${d}_${s}_${c}.txt"
: > "$out"
for impl in triton-split flex; do
  if [ $impl = flex ]; then k=regex:triton_tem_fused_flex_attention_backward skip=3 n=1; else k=regex:attn_bwd_kernel skip=6 n=2; fi
  echo "== $impl" >> "$out"
  ncu --clock-control none $sections -k $k --launch-skip $skip --launch-count $n -f -o "/tmp/ncu_bwd_$impl" \
    python3 benchmarks/ncu_triton_bwd.py $impl "$d" "$s" "$c" >> "$out" 2>&1
  ncu -i "/tmp/ncu_bwd_$impl.ncu-rep" --page details >> "$out" 2>&1
  if [ "${SOURCE:-0}" = 1 ]; then
    ncu -i "/tmp/ncu_bwd_$impl.ncu-rep" --page source --csv --print-source sass > "/tmp/ncu_sass_$impl.csv" 2>&1
    python3 benchmarks/ncu_sass_regions.py "/tmp/ncu_sass_$impl.csv" >> "$OUT/ncu_regions_${d}_${s}_${c}.txt"
  fi
done
grep -E "^==|attn_bwd_kernel|flex_attention_backward|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Thr|Memory Throughput|DRAM Throughput|L2 Hit|Executed Ipc A|Stall|Local" "$out" | head -120
