#!/usr/bin/env bash
# The decode GPU check in one device call (fits the 420 s limit): GPU tests of fwd_kvcache/combine on the
# Triton backend, the compiled CUDA-graph decode step, then bench_decode.py (table, config sweep, flex last).
# Logs and CSVs go to $OUT. Usage on the device, from the repo root: bash benchmarks/run_decode_gpu.sh
T0=$(date +%s)
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
# meta/ ships as flexattn_ops.meta only through the install (the device has no network: no deps, no isolation)
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v "^WARNING" ; python -c "import flexattn_ops" || exit 3
timeout 60 python -m pytest -q -p no:cacheprovider -p no:benchmark tests/test_ops.py -k cuda 2>&1 | tee "$OUT/gpu_opcheck.log" | tail -3
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
timeout 130 python -m pytest -q -n 4 -p no:cacheprovider -p no:benchmark tests/test_triton_decode_gpu.py \
  -k "not compiled" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
timeout 100 python -m pytest -q -s -p no:cacheprovider -p no:benchmark tests/test_triton_decode_gpu.py \
  -k compiled 2>&1 | tee "$OUT/gpu_compiled.log" | tail -15
E=$(($(date +%s) - T0))
timeout $((408 - E)) python benchmarks/bench_decode.py --sweep --deadline $((352 - E)) --flex-deadline $((360 - E)) \
  2>&1 | tee "$OUT/bench.log" | grep -v "^  "
