#!/usr/bin/env bash
# A/B of SM90 forward source trees in one device call. Each tree's extension is JIT-built (its own
# cache entry: the cache key hashes the sources) in parallel, then bench_attention.py times ours
# (FLEXATTN_BACKEND=cuda) beside cuDNN once per tree per round, the trees alternating, so each
# process's cuDNN number normalises the host's clock at that moment. Two builds of the extension
# cannot share a process (both register torch.ops.flexattn_cuda), hence one process per tree.
#
#   TREES="old=.devtmp/old:bf16_128x128 new=.:" ROUNDS=2 BENCH_ARGS="--dims 128x128 --seqs 512" \
#     [BUILD_ONLY="mutant=.devtmp/mutant:bf16_128x128"] [PRE="command after the builds"] \
#     [POST="command after the benchmark"] bash benchmarks/ab_cuda_fwd.sh
#
# A tree is `name=path:kernels`; `.` is this checkout (the editable install), any other path is a copy
# holding flexattn_ops/ (with meta/ inside it), csrc/ and benchmarks/. `kernels` is FLEXATTN_CUDA_KERNELS
# (empty: all). Logs go to $OUT (the tables are in them; each process's CSV stays in /tmp). Needs the nvidia-cutlass wheel in .whl/ (carried).
set -uo pipefail
OUT=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q -e . --no-deps --no-build-isolation || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

in_tree() {  # in_tree NAME=PATH:KERNELS COMMAND...: run COMMAND with that tree's package and kernels
  local spec=$1 path kernels
  shift
  path=${spec#*=}
  kernels=${path#*:}
  path=${path%%:*}
  if [ "$path" = . ]; then
    FLEXATTN_CUDA_KERNELS=$kernels PYTHONPATH=/tmp/site "$@"
  else
    (cd "$path" && FLEXATTN_CUDA_KERNELS=$kernels PYTHONPATH="$PWD:/tmp/site" "$@")
  fi
}

start=$(date +%s)
for tree in $TREES ${BUILD_ONLY:-}; do  # every build may use every core: most trees build few kernels
  MAX_JOBS=$(nproc) in_tree "$tree" python3 -c "from flexattn_ops import cuda_ext; print('${tree%%=*}:', cuda_ext.available() or 'loaded', [k.name for k in cuda_ext.kernels()])" 2>&1 | tail -3 &
done
wait
echo "builds: $(( $(date +%s) - start )) s on $(nproc) cores"
if [ -n "${PRE:-}" ]; then
  (PYTHONPATH=/tmp/site bash -c "$PRE") 2>&1 | tee "$OUT/pre.log" | tail -15
fi
for round in $(seq 1 "${ROUNDS:-2}"); do
  for tree in $TREES; do
    name=${tree%%=*}
    echo "== round $round: $name"
    in_tree "$tree" env OUT=/tmp python3 benchmarks/bench_attention.py --part core --impls cuda,sdpa_cudnn --modes fwd ${BENCH_ARGS:-} \
      2>&1 | tee "$OUT/ab_${name}_r$round.log" | grep -E "^\| [0-9]" | grep " fwd "
  done
done
if [ -n "${POST:-}" ]; then
  (PYTHONPATH=/tmp/site bash -c "$POST") 2>&1 | tee "$OUT/post.log" | tail -25
fi
