#!/usr/bin/env bash
# Runs mio_jax on this machine (CPU, or the local GPUs/TPU chips).
# Environment only: every hyper-parameter lives in the config file.
#
#   launch/local.sh --config=configs/default.py --workdir=/tmp/mio_default
#   launch/local.sh --config=configs/dpo_default.py --workdir=/tmp/dpo_default
#   launch/local.sh --config=configs/default.py:runlocal --workdir=/tmp/smoke
#
# Set MIO_CPU_DEVICES=8 to simulate 8 CPU devices (to try a sharded mesh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || launch/setup.sh
if [ -n "${MIO_CPU_DEVICES:-}" ]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${MIO_CPU_DEVICES}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m mio_jax.main "$@"
