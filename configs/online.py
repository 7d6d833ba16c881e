"""Online MIO on SmolLM2-135M-Instruct: rounds of sample -> verify -> pair -> train.

  python -m mio_jax.main --config=configs/online.py --workdir=/tmp/online_mio
  python -m mio_jax.main --config=configs/online.py:dpo --workdir=/tmp/online_dpo
  python -m mio_jax.main --config=configs/online.py:mio,lora --workdir=/tmp/online_lora
  python -m mio_jax.main --config=configs/online.py:mio,runlocal --workdir=/tmp/online_smoke

``arg`` is a method of METHODS (mio, dpo, rpo = DPO + NLL, js_multi, infonce, and sft: NLL on
each round's correct answers, no reference), optionally followed by ",lora" (a rank-16 LoRA
adapter on the frozen base, which is then the reference) and/or ",runlocal" (a one-minute smoke run). Every round
samples 8 answers to 64 single-digit arithmetic problems with the policy being trained (base
pass rate about 13 %: 103 of 800 in docs/results/study_a), pairs the best answer of a prompt
with its worst (K-way methods: the whole group) and trains 2 steps of 16 rows (about one
epoch of the round's pairs); the held-out eval (greedy, validation items from 1e9) runs at
the start and every 2 rounds.

The recipe starts from the published online preference settings for math (RLHFlow
Online-DPO-R1, `run_iter_dpo.sh`; DPO-VP, arXiv 2503.12854): 8 samples per prompt, best
against worst, the reference reset to the previous round's model, one or two epochs per
round, beta 0.1 for every method (also Eurus, arXiv 2404.02078, where NCA = MIO and DPO
share beta 0.1). Scaled to this CPU: 16 pairs per step (64-128 published; TRL's DPO example
16) and learning rate 5e-6 (published 5e-7 on 7B models over thousands of steps; 5x
SmolLM2's own DPO rate of 1e-6 for ~100x fewer steps, as in configs/study_a.py); LoRA 5e-5
(TRL's examples use 10x the full-weight rate for LoRA). docs/results/online ran the previous
recipe (learning rate 2e-5, 2 rows per step, the initial reference, gradient-matched betas).
"""

import os

from mio_jax import config as mio_config

_HERE = os.path.dirname(os.path.abspath(__file__))
default = mio_config.load_module(os.path.join(_HERE, "default.py"))
small = mio_config.load_module(os.path.join(_HERE, "reproduce_small.py"))

TASK_CONFIG = '{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}'
BETA = 0.1  # every method (see the module docstring)


# reproduce_small's methods, and SFT on the correct answers (each round's chosen answers,
# no reference): the control that tells a preference effect from imitation
METHODS = {**small.METHODS, "sft": ("sft", BETA, "best_vs_worst", {})}


def get_config(arg=None):
    """The online config of method ``arg`` ("mio" by default; see the module docstring)."""
    parts = [p.strip() for p in (arg or "mio").split(",") if p.strip()]
    method, options = parts[0], set(parts[1:])
    if method not in METHODS or options - {"lora", "runlocal"}:
        raise ValueError(f"configs/online.py: arg {arg!r}: expected METHOD[,lora][,runlocal] "
                         f"with METHOD one of {sorted(METHODS)}")
    loss, _, kway_mode, hparams = METHODS[method]
    c = default.get_config()
    c.data.eval_path = ""                # the rounds' own rows; the held-out eval is reasoning
    c.data.format = "auto"
    c.data.kway_mode = "group" if kway_mode == "group" else "best_vs_each"
    c.data.num_negatives = 3
    c.data.shared_prompt = kway_mode != "group"
    c.data.max_length = 192              # prompt ~70 + answer <= 96 tokens: nothing is cut
    c.data.bucketing = True
    c.data.pad_to_multiple_of = 64
    c.model.completion_logits_fraction = None

    c.loss.name = loss
    c.loss.beta = BETA
    for key, value in hparams.items():
        c.loss[key] = value
    c.reference.mode = "none" if loss == "sft" else "precomputed"  # once per round
    c.reference.batch_size = 8

    c.online.enabled = True
    c.online.rounds = 6
    c.online.prompts_per_round = 64
    c.online.samples_per_prompt = 8
    c.online.steps_per_round = 2
    c.online.tasks = "basic_arithmetic"
    c.online.task_config = TASK_CONFIG
    c.online.prompt_seed = 0
    c.online.temperature = 0.8
    c.online.top_p = 0.95
    c.online.max_new_tokens = 96
    c.online.sample_batch_size = 64
    c.online.pairs = "group" if kway_mode == "group" else "best_worst"
    c.online.reference = "previous"      # reset to the round's starting model each round
    c.online.eval_every_rounds = 2

    c.train.batch_size = 16
    c.optim.learning_rate = 5e-6
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    c.eval.every_steps = 0               # the held-out eval runs per round (online.eval_every_rounds)
    c.eval.at_start = True
    c.eval.batch_size = 8
    c.eval.reasoning_tasks = "basic_arithmetic"
    c.eval.reasoning_task_config = TASK_CONFIG
    c.eval.reasoning_examples = 100
    c.eval.reasoning_max_new_tokens = 96
    c.eval.reasoning_batch_size = 64

    if "lora" in options:
        c.model.lora.enabled = True
        c.model.lora.rank = 16
        c.model.lora.alpha = 32.0
        c.optim.learning_rate = 5e-5     # adapters take a larger step than full weights
    if "runlocal" in options:
        c.online.rounds = 2
        c.online.prompts_per_round = 4
        c.online.samples_per_prompt = 4
        c.online.steps_per_round = 2
        c.online.max_new_tokens = 24
        c.online.eval_every_rounds = 1
        c.eval.reasoning_examples = 4
        c.eval.reasoning_max_new_tokens = 24
        c.train.batch_size = 1
    return c
