"""Study A (docs/results/study_a/protocol.md): MIO against DPO on a fixed on-policy pair set,
trained long enough to pass DPO's peak, chosen log-ratios logged every epoch.

  python -m mio_jax.main --config=configs/study_a.py:mio --workdir=/tmp/study_a_mio \
      --config.seed=0 --config.loss.beta=0.1

``arg`` is the method: mio, dpo, rpo (DPO + NLL on the chosen answer, alpha 1) or sft (NLL
of the chosen answers alone). Settings and their sources:

- model: SmolLM2-135M-Instruct (the embedded GGUF), full weights, float32;
- data: the study's pairs (launch/study_a.sh builds them): the base model's own answers to
  single-digit arithmetic (K = 8 samples per prompt), a correct one against the incorrect
  one closest in length; the eval split is the training pairs themselves (the primary
  endpoint is their chosen log-ratio), the probe pairs are held out by prompt;
- beta 0.1 for every method (Eurus, arXiv 2404.02078: NCA and DPO at equal beta 0.1); the
  tuned beta is chosen on the validation split among {0.1, 0.5} (0.5: SmolLM2's own DPO
  recipe, alignment-handbook recipes/smollm2/dpo/config_smol.yaml);
- learning rate 5e-6, constant after 2 warm-up steps: the published full-weight range is
  5e-7 to 1e-6 over thousands of steps (SmolLM2's DPO 1e-6 for 2 epochs of ~61K pairs;
  "Learning Dynamics of LLM Finetuning", ICLR 2025: 5e-7 for 4-8 epochs), and 5e-6 is the
  NCA repository's (QLoRA) rate; a 5x step over SmolLM2's recipe stands in for the
  ~100x fewer steps this CPU can run;
- 8 pairs per step (TRL's DPO example uses 16; the study's pair set holds ~60 training
  pairs), 10 epochs (past DPO's peak: the learning-dynamics paper sees the decline after
  4-8 epochs), an eval every epoch;
- the frozen initial model as the reference (every published offline setting).
"""

import os

from mio_jax import config as mio_config

_HERE = os.path.dirname(os.path.abspath(__file__))
default = mio_config.load_module(os.path.join(_HERE, "default.py"))
online = mio_config.load_module(os.path.join(_HERE, "online.py"))

DATA = os.path.join(os.path.dirname(_HERE), "docs", "results", "study_a", "data")
METHODS = {"mio": ("mio", {}), "dpo": ("dpo", {}), "rpo": ("rpo", {"rpo_alpha": 1.0}),
           "sft": ("sft", {})}
BATCH = 8


def steps_per_epoch(train_pairs: int) -> int:
    """Optimizer steps of one epoch (the last partial batch dropped, as the trainer does)."""
    return max(1, train_pairs // BATCH)


def _count(path: str) -> int:
    if not os.path.isfile(path):  # before launch/study_a.sh has built the pairs
        return BATCH
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def get_config(arg=None):
    """The config of method ``arg`` (a key of METHODS; default "mio")."""
    method = arg or "mio"
    if method not in METHODS:
        raise ValueError(f"configs/study_a.py: unknown method {method!r}; known: "
                         f"{sorted(METHODS)}")
    loss, hparams = METHODS[method]
    c = default.get_config()
    train = os.path.join(DATA, "train_pairs.jsonl")
    c.data.train_path = train
    c.data.eval_path = train             # the primary endpoint: the training pairs' log-ratios
    c.eval.probe_path = os.path.join(DATA, "probe_pairs.jsonl")
    c.data.format = "auto"
    c.data.shuffle = True                # data order from config.seed: paired across methods

    c.loss.name = loss
    c.loss.beta = 0.1
    for key, value in hparams.items():
        c.loss[key] = value
    # sft needs no reference; its log-ratios come from logps/chosen against the step-0 eval
    # (the reference of the other arms is that same initial model)
    c.reference.mode = "none" if method == "sft" else "frozen"

    c.train.batch_size = BATCH
    c.train.epochs = 10.0
    c.optim.learning_rate = 5e-6
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 2

    every = steps_per_epoch(_count(train))
    c.eval.every_steps = every
    c.eval.at_start = True
    c.eval.max_batches = 0               # every pair
    c.eval.batch_size = 8
    c.eval.reasoning_tasks = "basic_arithmetic"
    c.eval.reasoning_task_config = online.TASK_CONFIG
    c.eval.reasoning_examples = 100
    c.eval.reasoning_split = "validation"
    c.eval.reasoning_max_new_tokens = 96
    c.eval.reasoning_batch_size = 64
    c.checkpoint.every_steps = every
    c.checkpoint.keep = 1
    c.log.every_steps = every
    return c
