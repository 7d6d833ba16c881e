"""GRPO rounds on SmolLM2-135M-Instruct: sample a group per prompt, reward, advantages,
policy-gradient steps, on the same task, prompts and sampler as configs/online.py.

  python -m mio_jax.main --config=configs/grpo.py --workdir=/tmp/grpo
  python -m mio_jax.main --config=configs/grpo.py:dapo --workdir=/tmp/dapo
  python -m mio_jax.main --config=configs/grpo.py:grpo,lora --workdir=/tmp/grpo_lora
  python -m mio_jax.main --config=configs/grpo.py:grpo,runlocal --workdir=/tmp/grpo_smoke

``arg`` is a recipe, optionally followed by ",lora" (a rank-16 adapter on the frozen base,
which is then the reference) and/or ",runlocal" (a one-minute smoke run):

- "grpo": TRL's GRPOConfig defaults (loss_type "dapo" token normalisation, epsilon 0.2,
  beta 0, scale_rewards "group", num_iterations 1) with the accuracy reward;
- "grpo_kl": DeepSeekMath's GRPO (arXiv 2402.03300): loss_type "grpo", beta 0.04 to the
  initial model;
- "dapo": DAPO (arXiv 2503.14476): clip-higher epsilon_high 0.28, dynamic sampling (groups
  whose answers all score alike are dropped), the soft overlong punishment (L_cache = a
  quarter of the token limit), beta 0;
- "rloo": RLOO's leave-one-out baseline (arXiv 2402.14740) with the "grpo" loss, beta 0.

Published settings, scaled like configs/online.py: 8 answers per prompt (TRL's default;
DeepSeekMath 64, DAPO 16), learning rate 1e-6 in TRL, DeepSeekMath and DAPO on 1.5-7B
models over hundreds of steps, here 5e-6 for a 135M model and a few dozen steps (LoRA
5e-5); 16 groups (128 answers) per optimizer step, 64 prompts per round, so one round is
4 steps, one pass over its rollouts (num_iterations 1, on-policy as in TRL's default).
"""

import os

from mio_jax import config as mio_config

_HERE = os.path.dirname(os.path.abspath(__file__))
online = mio_config.load_module(os.path.join(_HERE, "online.py"))

RECIPES = {
    "grpo": {},
    "grpo_kl": {"loss_type": "grpo", "beta": 0.04},
    "dapo": {"loss_type": "dapo", "epsilon_high": 0.28, "drop_zero_std_groups": True,
             "reward_funcs": "accuracy,soft_overlong_punishment", "soft_punish_cache": 24},
    "rloo": {"loss_type": "grpo", "advantage": "rloo"},
}


def get_config(arg=None):
    """The GRPO config of recipe ``arg`` ("grpo" by default; see the module docstring)."""
    parts = [p.strip() for p in (arg or "grpo").split(",") if p.strip()]
    recipe, options = parts[0], set(parts[1:])
    if recipe not in RECIPES or options - {"lora", "runlocal"}:
        raise ValueError(f"configs/grpo.py: arg {arg!r}: expected RECIPE[,lora][,runlocal] "
                         f"with RECIPE one of {sorted(RECIPES)}")
    c = online.get_config(",".join(["mio", *sorted(options)]))
    c.data.shared_prompt = True          # a group's prompt runs once, its answers in one row
    c.data.bucketing = False
    c.grpo.enabled = True
    c.grpo.num_generations = 8
    c.grpo.num_iterations = 1
    c.grpo.reward_funcs = "accuracy"
    c.grpo.scale_rewards = "group"
    for key, value in RECIPES[recipe].items():
        c.grpo[key] = value
    c.online.reference = "initial"       # the KL term's reference (grpo_kl)
    c.train.batch_size = 16              # groups per optimizer step
    if "runlocal" in options:
        c.grpo.num_generations = 4
        c.grpo.soft_punish_cache = min(c.grpo.soft_punish_cache, 6)
        c.train.batch_size = 2
    return c
