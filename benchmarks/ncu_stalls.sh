#!/usr/bin/env bash
# Where the SM90 forward's warps wait: Nsight Compute warp-state sampling per SASS instruction for one
# call (benchmarks/profile_cuda_fwd.py's shapes). Writes $OUT/stalls_S_D_C.txt: the kernel's stall
# reasons (WarpStateStats) and the 40 instructions with the most stall samples, with their reasons.
# Usage: bash benchmarks/ncu_stalls.sh SEQLEN HEADDIM CAUSAL
set -uo pipefail
OUT=${OUT:-/tmp}
s=$1 d=$2 c=$3
rep=/tmp/stalls_${s}_${d}_${c}
ncu --clock-control none --nvtx --nvtx-include profiled/ -k regex:fwd_kernel \
  --section WarpStateStats --section SourceCounters --section SpeedOfLight --import-source yes -f -o "$rep" \
  python3 benchmarks/profile_cuda_fwd.py "$s" "$d" "$c" > /dev/null 2>&1 || { echo "ncu failed"; exit 1; }
ncu -i "$rep.ncu-rep" --page details --print-details all > "$rep.details.txt" 2>&1
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.sass.csv" 2>&1
python3 benchmarks/ncu_stall_table.py "$rep.details.txt" "$rep.sass.csv" > "$OUT/stalls_${s}_${d}_${c}.txt"
