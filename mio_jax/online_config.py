"""The ``online`` section of the experiment config: its rules and the numbers derived from
it. A leaf module: the schema (``mio_jax.config``) checks the section through it, and the
round driver (``mio_jax.online``) reads it; neither depends on the other."""

from __future__ import annotations

import math

from mio_jax import heldout, paths, rewards, verifiers
from mio_jax.errors import ConfigError
from mio_jax.losses import policy as policy_lib

PAIR_RULES = {"best_worst": ("best_worst", 1), "length_matched": ("length_matched", 1),
              "all_pairs": ("pairs", 0), "group": ("group", 0)}
REFERENCES = ("initial", "previous")
SAMPLERS = ("groups", "static")


def enabled(config) -> bool:
    """True for an online run (``online.enabled``)."""
    return bool(config.get("online", {}).get("enabled", False))


def grpo_enabled(config) -> bool:
    """True when the online rounds are GRPO rounds (``grpo.enabled``)."""
    return enabled(config) and bool(config.get("grpo", {}).get("enabled", False))


def samples_per_prompt(config) -> int:
    """Answers sampled per prompt: ``grpo.num_generations`` in GRPO rounds, else K."""
    return int(config.grpo.num_generations if grpo_enabled(config)
               else config.online.samples_per_prompt)


def prompts_per_round(config) -> int:
    """Prompts of a round: M per task, and M more from the JSONL."""
    o = config.online
    return o.prompts_per_round * (len([t for t in o.tasks.split(",") if t.strip()]) + bool(o.jsonl))


def grpo_steps_per_round(config) -> int:
    """A GRPO round's most optimizer steps: num_iterations passes over every group (fewer
    when DAPO's dynamic sampling drops groups)."""
    per = -(-prompts_per_round(config) // int(config.train.batch_size))
    return int(config.grpo.num_iterations) * per


def total_steps(config) -> int:
    """Optimizer steps of the whole online run (rounds x steps per round)."""
    per = grpo_steps_per_round(config) if grpo_enabled(config) else config.online.steps_per_round
    return int(config.online.rounds) * int(per)


def grpo_hparams(config) -> dict:
    """``losses.policy_loss``'s keywords from the ``grpo`` section (TRL's names)."""
    g = config.grpo
    out = {"beta": float(g.beta), "epsilon": float(g.epsilon),
           "importance_sampling_level": g.importance_sampling_level,
           "use_bias_correction_kl": bool(g.use_bias_correction_kl),
           "sapo_temperature_pos": float(g.sapo_temperature_pos),
           "sapo_temperature_neg": float(g.sapo_temperature_neg),
           "max_completion_length": int(config.online.max_new_tokens)}
    for key in ("epsilon_high", "delta"):
        if g.get(key) is not None:
            out[key] = float(g[key])
    return out


def parse_rewards(config) -> list:
    """The round's reward functions (``mio_jax.rewards``) from the ``grpo`` section."""
    g = config.grpo
    return rewards.parse(g.reward_funcs, g.reward_weights,
                         max_completion_length=int(config.online.max_new_tokens),
                         soft_punish_cache=int(g.soft_punish_cache))


def validate_grpo_config(cfg) -> None:
    """Checks the ``grpo`` section of a GRPO run.

    Raises:
      ConfigError: naming the key.
    """
    g = cfg.grpo
    try:
        policy_lib.check_policy_loss_args(g.loss_type, g.importance_sampling_level)
    except ValueError as e:
        raise ConfigError(f"grpo.loss_type / grpo.importance_sampling_level: {e}") from e
    if g.num_generations < 2:
        raise ConfigError(f"grpo.num_generations={g.num_generations} must be >= 2 (a group "
                          "baseline needs two answers)")
    if g.num_iterations < 1:
        raise ConfigError(f"grpo.num_iterations={g.num_iterations} must be >= 1")
    if g.scale_rewards not in policy_lib.SCALE_REWARDS:
        raise ConfigError(f"grpo.scale_rewards={g.scale_rewards!r}: expected one of "
                          f"{policy_lib.SCALE_REWARDS}")
    if g.advantage not in ("group", "rloo"):
        raise ConfigError(f"grpo.advantage={g.advantage!r}: expected 'group' or 'rloo'")
    if g.beta < 0 or g.epsilon <= 0:
        raise ConfigError(f"grpo.beta={g.beta} must be >= 0 and grpo.epsilon={g.epsilon} > 0")
    try:
        parse_rewards(cfg)
    except ValueError as e:
        raise ConfigError(f"grpo.reward_funcs / grpo.reward_weights: {e}") from e
    if cfg.data.packing:
        raise ConfigError("grpo.enabled: rollout groups train in the unshared layout or, with "
                          "data.shared_prompt=True, one row per group; set data.packing=False")
    if prompts_per_round(cfg) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} groups is more than a "
                          f"round's {prompts_per_round(cfg)} prompts")


def validate_online_config(cfg) -> None:
    """Checks the ``online`` section (when enabled) and what it asks of the others.

    Raises:
      ConfigError: naming the key.
    """
    o = cfg.online
    if not o.enabled:
        return
    if grpo_enabled(cfg):
        validate_grpo_config(cfg)
    for key in ("rounds", "prompts_per_round", "steps_per_round", "max_new_tokens",
                "sample_batch_size"):
        if o[key] < 1:
            raise ConfigError(f"online.{key}={o[key]} must be >= 1")
    if o.samples_per_prompt < 2 and not grpo_enabled(cfg):
        raise ConfigError(f"online.samples_per_prompt={o.samples_per_prompt} must be >= 2 "
                          "(a pair needs a correct and an incorrect answer to one prompt)")
    if o.sampler not in SAMPLERS:
        raise ConfigError(f"online.sampler={o.sampler!r}: expected one of {SAMPLERS}")
    if grpo_enabled(cfg) and o.sampler != "groups":
        raise ConfigError("grpo.enabled samples with online.sampler='groups' (each sample's "
                          f"own random stream), got {o.sampler!r}")
    if o.eval_every_rounds < 0:
        raise ConfigError(f"online.eval_every_rounds={o.eval_every_rounds} must be >= 0")
    if o.pairs not in PAIR_RULES:
        raise ConfigError(f"online.pairs={o.pairs!r}: expected one of {sorted(PAIR_RULES)}")
    if o.reference not in REFERENCES:
        raise ConfigError(f"online.reference={o.reference!r}: expected one of {REFERENCES}")
    if cfg.reference.mode not in ("precomputed", "none"):
        raise ConfigError(
            f"reference.mode={cfg.reference.mode!r} with online.enabled: an online run "
            "precomputes each round's reference log-probs (online.reference picks the "
            "model), so set reference.mode='precomputed' (or 'none' for a reference-free "
            "loss)")
    if o.pairs == "group" and cfg.data.kway_mode != "group":
        raise ConfigError("online.pairs='group' needs data.kway_mode='group' (one K-way "
                          f"group per prompt), got data.kway_mode={cfg.data.kway_mode!r}")
    if not o.tasks.strip() and not o.jsonl:
        raise ConfigError("online.tasks and online.jsonl are both empty: no prompt source")
    if o.temperature < 0 or not 0 < o.top_p <= 1 or o.top_k < 0:
        raise ConfigError(f"online.temperature={o.temperature} must be >= 0, online.top_p="
                          f"{o.top_p} in (0, 1], online.top_k={o.top_k} >= 0")
    try:
        heldout.parse_task_config(o.task_config)
    except ValueError as e:
        raise ConfigError(f"online.task_config: {e}") from e
    last_seed = o.prompt_seed + o.rounds * o.prompts_per_round
    if o.tasks.strip() and (o.prompt_seed < 0 or last_seed > heldout.EVAL_SEED_BASE):
        raise ConfigError(f"online.prompt_seed={o.prompt_seed}: the rounds' item seeds "
                          f"[{o.prompt_seed}, {last_seed}) must lie below "
                          f"{heldout.EVAL_SEED_BASE} (the held-out range)")
    if o.jsonl and not paths.exists(o.jsonl):
        raise ConfigError(f"online.jsonl={o.jsonl!r}: file not found")
    if o.verifier:
        try:
            verifiers.get(o.verifier)
        except ValueError as e:
            raise ConfigError(f"online.verifier: {e}") from e
    if grpo_enabled(cfg):
        return
    sources = len([t for t in o.tasks.split(",") if t.strip()]) + bool(o.jsonl)
    k = o.samples_per_prompt
    per_prompt = (k // 2) * math.ceil(k / 2) if o.pairs == "all_pairs" else 1
    most = o.prompts_per_round * sources * per_prompt
    if most < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is more than a round can ever yield "
            f"({most} rows: online.prompts_per_round={o.prompts_per_round} x {sources} "
            f"source(s) x at most {per_prompt} per prompt)")
