"""The ``online`` section of the experiment config: its rules and the numbers derived from
it. A leaf module: the schema (``mio_jax.config``) checks the section through it, and the
round driver (``mio_jax.online``) reads it; neither depends on the other."""

from __future__ import annotations

import math

from mio_jax import heldout, paths, verifiers
from mio_jax.errors import ConfigError

PAIR_RULES = {"best_worst": ("best_worst", 1), "length_matched": ("length_matched", 1),
              "all_pairs": ("pairs", 0), "group": ("group", 0)}
REFERENCES = ("initial", "previous")


def enabled(config) -> bool:
    """True for an online run (``online.enabled``)."""
    return bool(config.get("online", {}).get("enabled", False))


def total_steps(config) -> int:
    """Optimizer steps of the whole online run (rounds x steps per round)."""
    return int(config.online.rounds) * int(config.online.steps_per_round)


def validate_online_config(cfg) -> None:
    """Checks the ``online`` section (when enabled) and what it asks of the others.

    Raises:
      ConfigError: naming the key.
    """
    o = cfg.online
    if not o.enabled:
        return
    for key in ("rounds", "prompts_per_round", "steps_per_round", "max_new_tokens",
                "sample_batch_size"):
        if o[key] < 1:
            raise ConfigError(f"online.{key}={o[key]} must be >= 1")
    if o.samples_per_prompt < 2:
        raise ConfigError(f"online.samples_per_prompt={o.samples_per_prompt} must be >= 2 "
                          "(a pair needs a correct and an incorrect answer to one prompt)")
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
    sources = len([t for t in o.tasks.split(",") if t.strip()]) + bool(o.jsonl)
    k = o.samples_per_prompt
    per_prompt = (k // 2) * math.ceil(k / 2) if o.pairs == "all_pairs" else 1
    most = o.prompts_per_round * sources * per_prompt
    if most < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is more than a round can ever yield "
            f"({most} rows: online.prompts_per_round={o.prompts_per_round} x {sources} "
            f"source(s) x at most {per_prompt} per prompt)")
