"""Small-scale reproduction of MIO vs DPO (issue 6): one config per method, same data and steps.

  python -m mio_jax.main --config=configs/reproduce_small.py:mio --workdir=/tmp/rs/mio \
      --config.data.train_path=/tmp/rs/pairs/groups.jsonl.gz

`launch/reproduce_small.sh` runs every method of METHODS on the on-policy K-way rows that
`configs/reproduce_pairs.py` builds. Everything but the loss (and, for the multi-negative losses,
how a K-way row becomes a training group) is shared: model SmolLM2-135M-Instruct, data, seed,
steps, batch size, optimiser and schedule.

Betas are gradient-matched (method.md section 4): MIO and the multi-negative JS loss use beta,
DPO, DPO + NLL (`rpo`) and InfoNCE beta / 2 (at z = 0 and K = 2 their first step equals MIO's).
Pairwise losses train on one pair per prompt (the first correct sample against the last distinct
incorrect one: `data.kway_mode = "best_vs_worst"`); `js_multi` and `infonce` train on the whole
group (the correct sample and up to 3 incorrect ones: `kway_mode = "group"`), so every method sees
the same prompts and positives in the same order, the group losses more negatives.
"""

import os

from mio_jax import config as mio_config

# The sibling experiment file, by path: this file runs from any working directory.
default = mio_config.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "default.py"))

BETA_MIO = 0.1
# method -> (loss name, beta, kway_mode, extra loss hyper-parameters)
METHODS = {
    "mio": ("mio", BETA_MIO, "best_vs_worst", {}),
    "dpo": ("dpo", BETA_MIO / 2, "best_vs_worst", {}),
    "rpo": ("rpo", BETA_MIO / 2, "best_vs_worst", {"rpo_alpha": 1.0}),
    "js_multi": ("js_multi", BETA_MIO, "group", {}),
    "infonce": ("infonce", BETA_MIO / 2, "group", {}),
}


def get_config(arg=None):
    """The config of method `arg` (a key of METHODS; default "mio")."""
    method = arg or "mio"
    if method not in METHODS:
        raise ValueError(f"configs/reproduce_small.py: unknown method {method!r}; known: {sorted(METHODS)}")
    loss, beta, kway_mode, hparams = METHODS[method]
    c = default.get_config()
    c.seed = 0
    c.data.train_path = "workdirs/reproduce_small/pairs/groups.jsonl.gz"
    c.data.eval_path = ""
    c.data.format = "kway"
    c.data.kway_mode = kway_mode
    c.data.shared_prompt = False        # K-way groups; and the committed results ran unshared
    c.data.num_negatives = 3
    c.data.max_length = 192             # prompt ~70 + completion <= 96 tokens: nothing is cut
    c.data.bucketing = False            # one static shape = one compile per run
    c.data.on_bad_row = "error"

    c.loss.name = loss
    c.loss.beta = beta
    for key, value in hparams.items():
        c.loss[key] = value

    c.train.steps = 30
    c.train.batch_size = 2
    c.train.grad_accum_steps = 1
    # A learning rate ~4x the default's so the late-training behaviour of the chosen
    # log-likelihood can show within a few minutes of CPU time.
    c.optim.learning_rate = 2e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 4

    c.reference.mode = "precomputed"    # reference log-probs cached once: no reference forward per step
    c.checkpoint.every_steps = 1000     # no intermediate checkpoints; the final model is exported
    c.checkpoint.keep = 1
    c.checkpoint.export_hf = True
    c.log.every_steps = 1
    c.log.progress_bar = False
    # One evaluation pass at the end over the training rows themselves (the launch script sets
    # data.eval_path to the training file): the mean log-ratio and log-prob of every chosen
    # response after training, free of the batch-to-batch noise of the train curves.
    # Held-out reasoning accuracy is measured afterwards with mio_jax.evaluate.
    c.data.eval_path = c.data.train_path
    c.eval.every_steps = 0
    c.eval.max_batches = 0
    c.eval.batch_size = 2
    c.eval.at_start = False
    return c
