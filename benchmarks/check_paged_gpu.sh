#!/usr/bin/env bash
# Issue 5, paged K/V looked up once per key tile: the check in one device call (~5 min of the 600 s limit).
#   1. tests/test_triton_varlen.py under TRITON_INTERPRET=1 (CPU tensors; without it the module skips itself)
#      on the device's Triton 3.6 / torch 2.11;
#   2. the compiled varlen kernels on the GPU against the float64 oracle (tests/test_triton_gpu.py -k varlen:
#      packed, paged pages of 1 / 16 / 64 / 256, seqused_k + sinks, dropout, CUDA-graph capture);
#   3. benchmarks/bench_varlen.py: dense vs packed varlen vs paged-256 / paged-16, forward and fwd+bwd.
# Logs and the CSV go to $OUT. Usage on the device, from the repo root: bash benchmarks/check_paged_gpu.sh
T0=$(date +%s)
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
# meta/ ships as flexattn_ops.meta only through the install (the device has no network: no deps, no isolation)
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v "^WARNING"
python -c "import flexattn_ops" || exit 3
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== 1. tests/test_triton_varlen.py (TRITON_INTERPRET=1)"
TRITON_INTERPRET=1 timeout 150 python -m pytest -q -x -n 8 -p no:cacheprovider -p no:benchmark \
  tests/test_triton_varlen.py 2>&1 | tee "$OUT/interp_varlen_tests.log" | tail -15
echo "== 2. tests/test_triton_gpu.py -k varlen (compiled, on the GPU)"
timeout 150 python -m pytest -q -x -n 8 -p no:cacheprovider -p no:benchmark tests/test_triton_gpu.py -k varlen \
  2>&1 | tee "$OUT/gpu_varlen_tests.log" | tail -25
E=$(($(date +%s) - T0))
echo "== 3. bench_varlen.py --modes fwd,fwd_bwd --pages 256,16 (started at ${E} s)"
# the tuned table's tiles (as the recorded run): no autotuning inside the time limit
FLEXATTN_TRITON_AUTOTUNE=0 OUT="$OUT" timeout $((580 - E)) python benchmarks/bench_varlen.py --modes fwd,fwd_bwd \
  --pages 256,16 2>&1 | tee "$OUT/bench_varlen.log"
echo "== done in $(($(date +%s) - T0)) s"
