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
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
[ -x .venv/bin/python ] || { echo "run launch/setup.sh and pip install 'jax[cuda12]' first" >&2; exit 1; }

export JAX_COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):${MIO_COORDINATOR_PORT:-12355}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# srun starts one task per GPU; each sets its process id and calls
# jax.distributed.initialize() (main.py does when JAX_NUM_PROCESSES > 1).
srun --kill-on-bad-exit=1 bash -c '
  export JAX_PROCESS_ID=$SLURM_PROCID
  export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  exec .venv/bin/python -m mio_jax.main "$@"
' mio_jax "$@"
