"""JAX's multi-process runtime, as mio_jax uses it: start-up, per-host logging, preemption.

One process runs per host (TPU VM worker, SLURM task, or a process of ``mio_jax.local_pod``);
``jax.distributed`` connects them. The coordinator comes from the environment:
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when set (the
contract ``launch/slurm_gpu.sh`` and ``mio_jax.local_pod`` write), else JAX's own detection
(TPU VM metadata, SLURM variables).
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def multi_process_env(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a run of several processes (any of the launchers'
    variables: the explicit contract, SLURM, or a TPU pod's worker list)."""
    env = os.environ if env is None else env
    return ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)


def initialize(env: Mapping[str, str] | None = None) -> None:
    """``jax.distributed.initialize`` with the coordinator of the environment, if given."""
    env = os.environ if env is None else env
    kw = {}
    if "JAX_COORDINATOR_ADDRESS" in env:  # explicit settings win over auto-detection
        kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kw)


class _ProcessTag(py_logging.Filter):
    """Prefixes every record with the process index, so interleaved logs stay readable."""

    def __init__(self, index: int):
        super().__init__()
        self.prefix = f"[process {index}] "

    def filter(self, record: py_logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def configure_logging() -> None:
    """Per-step lines from process 0 only: the other processes log warnings and errors,
    tagged with their index."""
    if jax.process_count() == 1:
        return
    index = jax.process_index()
    logging.get_absl_handler().addFilter(_ProcessTag(index))
    if index != 0:
        logging.set_verbosity(logging.WARNING)


def refuse_multi_process(command: str) -> None:
    """Stops a command that runs its model on one process when launched as several
    (every host would compute and write the same output): exit status 2."""
    if multi_process_env():
        print(f"error: {command} runs on one process (it generates with the whole model on "
              "this host's devices); it was started as one of several JAX processes "
              "(JAX_NUM_PROCESSES / SLURM_NTASKS / TPU_WORKER_HOSTNAMES). Run it once, on one "
              "host, on a Hugging Face folder (a run's hf_export, or `python -m "
              "mio_jax.convert WORKDIR DST`).", file=sys.stderr, flush=True)
        raise SystemExit(2)


# ---- agreement across processes: a decision one process takes alone is a hang waiting
# for a pod. Every function below is a collective: all processes must call it together.

def process_values(value: int) -> np.ndarray:
    """Every process's integer ``value``, in process order (one all-gather)."""
    if jax.process_count() == 1:
        return np.array([int(value)])
    return np.asarray(multihost_utils.process_allgather(
        np.array([int(value)], np.int32))).reshape(-1)


def all_true(flag: bool) -> bool:
    """True when ``flag`` holds on every process."""
    return bool(np.all(process_values(int(bool(flag)))))


def from_process_zero(flag: bool) -> bool:
    """Process 0's ``flag``, for every process (e.g. what process 0 read from a file)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))
