#!/usr/bin/env bash
# One device call for the SM90 CUDA forward: JIT build (timed), the GPU tests and opcheck, compute-sanitizer
# memcheck, then (PART=bench) the forward benchmark beside the peers. Logs go to $OUT.
# Needs the nvidia-cutlass wheel in .whl/ (carried): only its headers are used.
set -uo pipefail
OUT=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MAX_JOBS=16
python3 -m pip install -q -e . --no-deps --no-build-isolation || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
start=$(date +%s)
python3 -c "from flexattn_ops import cuda_ext; print('extension:', cuda_ext.available() or 'loaded', [k.name for k in cuda_ext.kernels()])" 2>&1 | tail -5
echo "JIT build of the default kernels: $(( $(date +%s) - start )) s on $(nproc) cores"
if [ "${PART:-test}" = test ]; then
  python3 -m pytest -q -rs -n 8 -p no:cacheprovider tests/test_cuda_backend.py 2>&1 | tee "$OUT/test_cuda_backend.log" | tail -25
  # opcheck of every op on the GPU, where `auto` now picks the CUDA forward for SM90-runnable inputs
  python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_ops.py 2>&1 | tee "$OUT/test_ops_gpu.log" | tail -5
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --print-limit 20 python3 benchmarks/sanitize_cuda_fwd.py 2>&1 | tee "$OUT/memcheck.log" | tail -8
else
  python3 benchmarks/bench_attention.py --impls cuda,triton,sdpa_flash,sdpa_cudnn,flex --modes fwd ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_cuda_fwd.log" | grep -v "TFLOP/s  (" | tail -80
fi
