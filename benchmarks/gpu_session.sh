#!/bin/bash
# Issue 10's GPU checks in one call (a lent GPU machine; see BUILD.md "GPU figures"):
#   bash benchmarks/gpu_session.sh [STAGE ...]   # default: kernels train logprob
# stages: kernels train train_jax train_pallas train_triton logprob logprob_triton
# Logs go to $OUT (or /tmp/dpojax-gpu). Packages the GPU image lacks travel as wheels in .whl/.
set -u
OUT=${OUT:-/tmp/dpojax-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"

stage() {  # stage NAME SECONDS COMMAND...: log to $OUT/NAME.log, show it without tracebacks.
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E '^(  File|    |Traceback|--------------------|For simplicity)' "$OUT/$name.log" | tail -40
  echo "=== $name rc=$rc $((SECONDS - start))s"
}

# 0.9 of the GPU for the 1B runs' arrays; the kernel checks keep JAX's default 0.75 (CUDA
# graphs need driver memory outside it).
TRAIN="env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 benchmarks/train_throughput.py --model=1b --data=packed --pack_size=4096 \
  --rows=8 --micro_rows=2 --attention_impl=flash --attention_block=0"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(kernels train logprob)
for s in "${stages[@]}"; do
  case $s in
    kernels) stage kernels 180 python3 benchmarks/gpu_check.py ;;
    train) stage train 150 $TRAIN --logprob_impl=chunked --steps=6 --warmup=2 ;;
    train_jax) stage train_jax 130 $TRAIN --logprob_impl=chunked --flash_kernel=jax --steps=6 \
      --warmup=2 ;;
    train_pallas) stage train_pallas 150 $TRAIN --logprob_impl=pallas --steps=6 --warmup=2 ;;
    train_triton) stage train_triton 150 $TRAIN --logprob_impl=triton --steps=6 --warmup=2 ;;
    logprob) stage logprob 80 python3 benchmarks/logprob.py --dtype=bfloat16 \
      --shapes=16384x2048x32000,16384x2048x128256 --masked_in=1 --runs=5 ;;
    logprob_triton) stage logprob_triton 45 python3 benchmarks/logprob.py --dtype=bfloat16 \
      --shapes=16384x2048x32000 --impls=chunked,triton --masked_in=1 --runs=5 ;;
  esac
done
