#!/usr/bin/env bash
# Runs mio_jax on every worker of a Cloud TPU VM (single host or pod slice).
# Environment only: hyper-parameters live in the config file passed through.
#
#   launch/tpu_pod.sh NAME ACCELERATOR ZONE [mio_jax.main flags...]
#   launch/tpu_pod.sh my-v5p v5p-64 us-east5-a \
#       --config=configs/paper.py:llama3_8b,mio,v5p-64 --workdir=/mnt/shared/mio_llama3_8b
#
# Creates the TPU VM if it does not exist (RUNTIME overrides the software version;
# SPOT=1 asks for a preemptible/spot slice), copies this checkout to every worker,
# installs it, and starts `python -m mio_jax.main` on all workers at once. JAX on a
# TPU VM finds its peers itself; main.py calls jax.distributed.initialize() when
# TPU_WORKER_HOSTNAMES lists several hosts. On preemption the VM sends SIGTERM and
# the trainer writes a checkpoint; rerun the same command to resume.
#
# Rehearsal on one machine (no TPU, no gcloud): MIO_LOCAL_PROCESSES=N (and
# MIO_LOCAL_DEVICES=D CPU devices per process) runs the trainer as N local processes
# with mio_jax.local_pod, which sets the launchers' environment contract
# (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); pass only the flags:
#
#   MIO_LOCAL_PROCESSES=4 MIO_LOCAL_DEVICES=2 bash launch/tpu_pod.sh \
#       --config=configs/default.py --workdir=workdirs/pod_rehearsal
set -euo pipefail
if [ -n "${MIO_LOCAL_PROCESSES:-}" ]; then
  cd "$(dirname "$0")/.."
  [ -x .venv/bin/python ] || bash launch/setup.sh
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  exec .venv/bin/python -m mio_jax.local_pod --num_processes="$MIO_LOCAL_PROCESSES" \
    --devices_per_process="${MIO_LOCAL_DEVICES:-1}" -- .venv/bin/python -m mio_jax.main "$@"
fi
if [ $# -lt 3 ]; then
  sed -n '2,23p' "$0"; exit 2
fi
NAME=$1 ACCEL=$2 ZONE=$3; shift 3
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
cd "$(dirname "$0")/.."

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" $PROJECT_FLAG >/dev/null 2>&1; then
  echo "creating TPU VM $NAME ($ACCEL in $ZONE)"
  gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL" \
    --version="$RUNTIME" ${SPOT:+--spot} $PROJECT_FLAG
fi

tarball=$(mktemp /tmp/mio_jax.XXXXXX.tar.gz)
git ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --null -T -
gcloud compute tpus tpu-vm scp "$tarball" "$NAME":~/mio_jax.tar.gz --worker=all \
  --zone="$ZONE" $PROJECT_FLAG
rm -f "$tarball"

# Quote the trainer's flags once for the remote shell.
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --zone="$ZONE" $PROJECT_FLAG --command="
  set -e
  mkdir -p ~/mio_jax && tar -xzf ~/mio_jax.tar.gz -C ~/mio_jax && cd ~/mio_jax
  python3 -m venv .venv
  .venv/bin/pip install --quiet -U pip
  .venv/bin/pip install --quiet -e . 'jax[tpu]'
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  .venv/bin/python -m mio_jax.main $args
"
