#!/usr/bin/env bash
# Our SM90 forward beside cuDNN's under Nsight Compute: for each "SEQLEN:HEADDIM:CAUSAL:IMPL" case
# (IMPL cuda or cudnn; benchmarks/profile_cuda_fwd.py) the launch configuration (grid, block, cluster,
# registers, shared memory), speed of light, memory workload and occupancy of every kernel the
# profiled call launches. Appends to $OUT/ncu_peer_fwd.txt.
# Usage: bash benchmarks/ncu_peer_fwd.sh 512:128:0:cudnn 512:128:0:cuda ...
set -uo pipefail
OUT=${OUT:-/tmp}
for case in "$@"; do
  IFS=: read -r s d c impl <<< "$case"
  echo "=== seqlen $s, head dim $d, causal $c, $impl" >> "$OUT/ncu_peer_fwd.txt"
  ncu --clock-control none --nvtx --nvtx-include profiled/ --section LaunchStats --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section ComputeWorkloadAnalysis \
    python3 benchmarks/profile_cuda_fwd.py "$s" "$d" "$c" "$impl" 2>&1 | grep -v "^==PROF==" >> "$OUT/ncu_peer_fwd.txt"
done
