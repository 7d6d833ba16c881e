#!/usr/bin/env bash
# SLURM batch script for multi-node GPU runs: one process per GPU.
# Environment only: hyper-parameters live in the config file passed through.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh \
#       --config=configs/paper.py:qwen2.5_7b,mio,h100x8 --workdir=/checkpoints/mio_qwen7b
#
# The coordinator is the first node of the allocation; every task learns its
# process id from SLURM_PROCID and sees one GPU. On the time limit SLURM sends
# SIGTERM (--signal below gives the trainer 120 s) and the trainer writes a
# checkpoint; resubmitting the same command resumes from it.
#SBATCH --job-name=mio_jax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=12
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%j.out
#
# Rehearsal on one machine (no SLURM, no GPU): MIO_LOCAL_PROCESSES=N (and
# MIO_LOCAL_DEVICES=D CPU devices per process) runs the same script with the SLURM
# variables simulated and srun replaced by N local tasks on 127.0.0.1:
#
#   MIO_LOCAL_PROCESSES=2 MIO_LOCAL_DEVICES=4 bash launch/slurm_gpu.sh \
#       --config=configs/default.py --workdir=workdirs/slurm_rehearsal
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
[ -x .venv/bin/python ] || { echo "run launch/setup.sh and pip install 'jax[cuda12]' first" >&2; exit 1; }

if [ -n "${MIO_LOCAL_PROCESSES:-}" ]; then
  export SLURM_NTASKS=$MIO_LOCAL_PROCESSES SLURM_JOB_NODELIST=127.0.0.1
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${MIO_LOCAL_DEVICES:-1}"
  MIO_COORDINATOR_PORT=${MIO_COORDINATOR_PORT:-$(.venv/bin/python -c 'from mio_jax.local_pod import free_port; print(free_port())')}
  first_host() { echo 127.0.0.1; }
  srun() {  # what this script needs of srun: one task per process; one failing stops all
    [ "$1" = "--kill-on-bad-exit=1" ] && shift
    local pids=() i
    for ((i = 0; i < SLURM_NTASKS; i++)); do
      SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!)
    done
    trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
    local status=0
    for ((i = 0; i < SLURM_NTASKS; i++)); do
      if ! wait -n; then status=1; kill "${pids[@]}" 2>/dev/null || true; fi
    done
    return $status
  }
else
  first_host() { scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1; }
fi

# The environment contract of every launcher (and of mio_jax.local_pod): main.py reads
# these and calls jax.distributed.initialize().
export JAX_COORDINATOR_ADDRESS="$(first_host):${MIO_COORDINATOR_PORT:-12355}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# srun starts one task per GPU; each sets its process id.
srun --kill-on-bad-exit=1 bash -c '
  export JAX_PROCESS_ID=$SLURM_PROCID
  export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  exec .venv/bin/python -m mio_jax.main "$@"
' mio_jax "$@"
