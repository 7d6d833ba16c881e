"""A tiny experiment for tests: a few steps of a random 2-layer model.

Tests pass the checkpoint and data they write themselves:

  python -m mio_jax.main --config=configs/tiny_test.py --workdir=DIR \
      --config.model.path=TINY_HF_DIR --config.data.train_path=T.jsonl \
      --config.data.eval_path=E.jsonl
"""

from mio_jax import config as mio_config


def get_config(arg=None):
    """Tiny config; ``arg`` "dpo" switches the loss (beta halved), "none" ref-free SimPO."""
    c = mio_config.base_config()
    c.model.path = "MISSING"             # set by the test
    c.model.scan_layers = True
    c.model.logps_chunk_size = 64
    c.data.train_path = "MISSING"
    c.data.eval_path = "MISSING"
    c.data.max_length = 32
    c.data.bucketing = False
    c.data.shuffle = True
    c.loss.name = "mio"
    c.loss.beta = 0.1
    c.train.steps = 6
    c.train.batch_size = 8
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 1
    c.mesh.shape = (1, -1, 1)
    c.reference.batch_size = 8
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 5
    c.checkpoint.async_save = False
    c.log.every_steps = 1
    c.log.progress_bar = False
    c.log.peak_flops_per_device = 1e11
    c.eval.every_steps = 3
    c.eval.batch_size = 8
    c.eval.max_batches = 2
    if arg == "dpo":
        c.loss.name = "dpo"
        c.loss.beta = 0.05
    return c
