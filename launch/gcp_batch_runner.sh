#!/usr/bin/env bash
# Runs on every VM of a Google Cloud Batch job (launch/gcp_batch_job.json). Batch sets
# BATCH_TASK_INDEX, BATCH_TASK_COUNT and, with requireHostsFile, BATCH_HOSTS_FILE (one host per
# task, in task order); task 0's host is the jax.distributed coordinator.
set -euo pipefail
cd "${DPOJAX_REPO:?}"
python3 -m pip install -q -e '.[gpu]'
coordinator="$(head -n 1 "${BATCH_HOSTS_FILE:?}")"
export DPOJAX_COORDINATOR="${coordinator}:${DPOJAX_PORT:-8476}"
export DPOJAX_NUM_PROCESSES="${BATCH_TASK_COUNT:?}"
export DPOJAX_PROCESS_ID="${BATCH_TASK_INDEX:?}"
# A preempted Spot VM gets SIGTERM: dpojax checkpoints and exits 0; the retried task resumes
# from the same workdir.
exec python3 -m dpojax.main ${DPOJAX_ARGS:?}
