"""Command-line entry point: ``python -m mio_jax.main --config=configs/default.py --workdir=DIR``.

``--config`` is an experiment file anywhere on disk whose ``get_config(arg=None)`` builds on
``mio_jax.config.base_config()`` (``--config=FILE:ARG`` passes ARG). Config values are
overridden on the command line, e.g.
``--config.loss.name=dpo --config.loss.beta=0.05 --config.train.steps=200``. The resolved
config (every key with the value the run uses) is logged at start; a file that does not
load or a bad value stops the run with one line naming the file or key (exit status 2).
On several processes (TPU pod, SLURM), ``jax.distributed.initialize()`` runs first; its
coordinator comes from the environment.
"""

import os
import sys

import flax
import jax
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from mio_jax import config as mio_config
from mio_jax import cli, distributed, errors, online, online_config, train

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Experiment file (configs/*.py or your own).",
                                flag_values=FLAGS, lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, export).",
                    flag_values=FLAGS)
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: auto "
                  "when SLURM/TPU multi-process variables are set).", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def _parse_flags(argv):
    """absl's flag parsing; an experiment file or override that fails is one line, exit 2."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))]
    path = given[-1].split(":", 1)[0] if given else ""
    if path and not os.path.isfile(path):
        errors.fail(f"experiment file {path!r} not found")
    keys = [a.split("=", 1)[0].split(".", 1)[1] for a in argv if a.startswith("--config.")]
    return cli.parse(FLAGS, argv, doc=__doc__,
                     describe=lambda e: mio_config.describe_load_error(e, path, keys))


def main(argv):
    del argv
    use = FLAGS.distributed
    if distributed.multi_process_env() if use is None else use:
        distributed.initialize()  # before anything touches a device
    distributed.configure_logging()
    try:
        mio_config.validate(FLAGS.config, num_devices=jax.device_count())
        config = mio_config.resolve(FLAGS.config)
    except mio_config.ConfigError as e:
        errors.fail(str(e))
    logging.info("versions: python %s, jax %s, flax %s, optax %s, orbax %s", sys.version.split()[0],
                 jax.__version__, flax.__version__, optax.__version__, ocp.__version__)
    logging.info("process %d/%d; devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    logging.info("config (resolved: every key with the value this run uses):\n%s", config)
    try:
        with errors.input_errors_in_one_line():  # a bad row, file or key: one line, exit 2
            # an online run's rounds build on the trainer's stages; main picks the driver
            driver = online if online_config.enabled(config) else train
            result = driver.train_and_evaluate(config, FLAGS.workdir)
    except ValueError as e:  # not a known input error: where it came from, for bug reports
        logging.exception("run failed")
        errors.fail(f"{type(e).__name__}: {e}")
    summary = {k: v for k, v in result.items() if k in ("step", "train", "eval", "export")}
    if jax.process_index() == 0:
        print(f"done: {summary}", flush=True)


def run() -> None:
    """The ``mio-train`` command: ``python -m mio_jax.main``'s flags."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
