#!/usr/bin/env bash
# Starts N dpojax processes on this machine that train together (jax.distributed).
# Usage: bash launch/local.sh N --config=configs/dpo_gpt.py --workdir=/tmp/run [overrides...]
# On a CPU-only machine each process drives one CPU device; collectives use gloo.
set -euo pipefail
n="$1"; shift
port="${DPOJAX_PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}"
pids=()
for ((i = 0; i < n; i++)); do
  DPOJAX_COORDINATOR="localhost:${port}" DPOJAX_NUM_PROCESSES="$n" DPOJAX_PROCESS_ID="$i" \
    python -m dpojax.main "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
