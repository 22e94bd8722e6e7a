#!/usr/bin/env bash
# One device call for the Triton backend: retune (TUNE="<tune_triton.py args>;<args>;..." run in order, each
# run's table copied into the package before the next), the GPU tests against the oracle (TEST_FILES, default
# tests/test_triton_gpu.py), the host-time breakdowns (HOST=1: launch_overhead.py, host_overhead_autograd.py),
# then the benchmark (BENCH="<bench_attention.py args>;<args>;..."). Logs, CSVs and the final tuned table go
# to $OUT.
# Step time limits (TUNE_S, TEST_S, BENCH_S seconds) keep the later steps inside the call's limit.
set -uo pipefail
OUT=${OUT:-/tmp}
export FLEXATTN_CUDA_JIT=0 TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1 FLEXATTN_CACHE_DIR=/tmp/flexattn_cache
python3 -m pip install -q -e . --no-deps --no-build-isolation || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -n "${TUNE:-}" ]; then
  IFS=';' read -ra runs <<< "$TUNE"
  for args in "${runs[@]}"; do
    echo "== tune_triton.py $args"
    # shellcheck disable=SC2086
    timeout "${TUNE_S:-300}" python3 benchmarks/tune_triton.py $args 2>&1 | grep -v "^ \|^{" >> "$OUT/tune.log"
    cp "$OUT/triton_configs.py" flexattn_ops/triton_configs.py
  done
  rm -f "$OUT/triton_tuning.json"
  tail -3 "$OUT/tune.log"
fi
if [ "${TESTS:-1}" = 1 ]; then
  # shellcheck disable=SC2086
  timeout "${TEST_S:-300}" python3 -m pytest -q -n 8 -p no:cacheprovider ${TEST_FILES:-tests/test_triton_gpu.py} \
    2>&1 | tee "$OUT/gpu_tests_triton.log" | tail -4
fi
if [ "${HOST:-0}" = 1 ]; then
  { timeout 120 python3 benchmarks/launch_overhead.py
    timeout 240 python3 benchmarks/host_overhead_autograd.py --rounds 7; } > "$OUT/host.log" 2>&1
  head -70 "$OUT/host.log"
fi
if [ -n "${BENCH:-}" ]; then
  IFS=';' read -ra runs <<< "$BENCH"
  i=0
  for args in "${runs[@]}"; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    timeout "${BENCH_S:-300}" python3 benchmarks/bench_attention.py $args 2>&1 | tee "$OUT/bench_$i.log" \
      | grep "^|\|done in"
    for f in "$OUT"/bench_core.csv "$OUT"/bench_pairs.csv "$OUT"/bench_all.csv; do [ -f "$f" ] && mv "$f" "${f%.csv}_$i.csv"; done
  done
fi
