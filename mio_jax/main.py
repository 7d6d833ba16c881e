"""Command-line entry point: ``python -m mio_jax.main --config=configs/default.py --workdir=DIR``.

Config values are overridden on the command line, e.g.
``--config.loss.name=dpo --config.loss.beta=0.05 --config.train.steps=200``.
On several processes (TPU pod, SLURM), ``jax.distributed.initialize()`` runs
first; its coordinator comes from the environment.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, export).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: auto "
                  "when SLURM/TPU multi-process variables are set).")
flags.mark_flags_as_required(["config", "workdir"])


def _multi_process() -> bool:
    if flags.FLAGS.distributed is not None:
        return flags.FLAGS.distributed
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in env
            or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
            or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)


def main(argv):
    del argv
    import jax

    if _multi_process():
        env = os.environ  # explicit settings (launch/slurm_gpu.sh) win over auto-detection
        kw = {}
        if "JAX_COORDINATOR_ADDRESS" in env:
            kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]),
                      process_id=int(env["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kw)
    import flax
    import optax
    import orbax.checkpoint as ocp

    from mio_jax import train
    from mio_jax.config_validation import ConfigError

    config = flags.FLAGS.config
    logging.info("versions: python %s, jax %s, flax %s, optax %s, orbax %s", sys.version.split()[0],
                 jax.__version__, flax.__version__, optax.__version__, ocp.__version__)
    logging.info("process %d/%d; devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    logging.info("config:\n%s", config)
    try:
        result = train.train_and_evaluate(config, flags.FLAGS.workdir)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if not isinstance(e, ConfigError):  # where it came from, for bug reports
            logging.exception("run failed")
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    summary = {k: v for k, v in result.items() if k in ("step", "train", "eval", "export")}
    print(f"done: {summary}", flush=True)


if __name__ == "__main__":
    app.run(main)
