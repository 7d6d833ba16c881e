"""Held-out verifiable problems and the ``eval`` section's checks (a leaf: the config schema,
the trainer's evaluation and the commands read it).

reasoning-gym item i of a data set created with seed S is drawn from ``Random(S + i)``.
Held-out problems come in two splits with disjoint item seeds: "validation" (S = 1e9 + seed,
for choosing hyper-parameters; the trainer's held-out evals use it) and "test" (S = 1.5e9 +
seed, reported once). Training data and on-policy pairs use item seeds below 1e9
(``check_training_seeds``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from mio_jax.errors import ConfigError, InputError

# The system prompt of the committed reasoning set, of the held-out evaluations and of the
# online rounds: it asks for a final "The answer is N." line.
DEFAULT_SYSTEM = (
    "You are a careful math tutor. Solve the problem step by step and end with "
    "a final line of the form 'The answer is N.'"
)

# The first item seed of each held-out split; a split's seed + num_examples stays below
# SPLIT_SPAN, so validation items [1e9, 1.5e9) and test items [1.5e9, 2e9) never meet.
HELD_OUT_SPLITS = {"validation": 10**9, "test": 1_500_000_000}
SPLIT_SPAN = 500_000_000
EVAL_SEED_BASE = HELD_OUT_SPLITS["validation"]  # below it: training items


def parse_task_config(text: str) -> dict[str, Any]:
    """A reasoning-gym task config from JSON text ("" = the task's defaults); lists become tuples.

    Example: '{"min_digits": 1, "max_digits": 1, "operators": ["+", "-"]}'.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"task_config: not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise InputError(f"task_config: expected a JSON object, got {text!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def reasoning_gym_examples(task: str, num_examples: int, seed: int,
                           task_config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """`num_examples` rows of reasoning-gym `task` created with seed `seed` (as given).

    Args:
      task: reasoning-gym task name.
      num_examples: rows to create.
      seed: the data set seed (item i uses seed + i).
      task_config: keyword arguments of the task's config (difficulty: digits, terms, ...);
        None or {} = the task's defaults.

    Rows: {"task", "question", "answer", "metadata"}; what `verifiers.reasoning_gym` needs.
    """
    import reasoning_gym

    try:
        ds = reasoning_gym.create_dataset(task, size=num_examples, seed=seed, **dict(task_config or {}))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"reasoning-gym task {task!r} with config {dict(task_config or {})}: {e}") from e
    return [{"task": task, "question": e["question"], "answer": str(e["answer"]),
             "metadata": e.get("metadata", {})} for e in ds]


def heldout_examples(task: str, num_examples: int, seed: int,
                     task_config: Mapping[str, Any] | None = None,
                     split: str = "validation") -> list[dict[str, Any]]:
    """Held-out evaluation rows of ``split`` (``HELD_OUT_SPLITS``): item seeds from the
    split's base + ``seed`` on, disjoint from training and from the other split."""
    if split not in HELD_OUT_SPLITS:
        raise InputError(f"held-out split {split!r}: expected one of {list(HELD_OUT_SPLITS)}")
    if seed < 0 or seed + num_examples > SPLIT_SPAN:
        raise InputError(f"held-out seed {seed} with {num_examples} problems leaves the "
                         f"{split} split: seed + num_examples must lie in [0, {SPLIT_SPAN}]")
    return reasoning_gym_examples(task, num_examples, HELD_OUT_SPLITS[split] + seed,
                                  task_config)


def check_training_seeds(seed: int, num_examples: int) -> None:
    """Raises if reasoning-gym items [seed, seed + num_examples) reach the evaluation range."""
    if seed < 0 or seed + num_examples > EVAL_SEED_BASE:
        raise ValueError(f"training item seeds [{seed}, {seed + num_examples}) must lie in "
                         f"[0, {EVAL_SEED_BASE}): seeds from {EVAL_SEED_BASE} on are held out for evaluation")


def reasoning_tasks(cfg) -> list[str]:
    """``eval.reasoning_tasks`` as a list of reasoning-gym task names."""
    return [t.strip() for t in cfg.eval.get("reasoning_tasks", "").split(",") if t.strip()]


def validate_eval_config(cfg) -> None:
    """Checks the ``eval`` section of a training config.

    Rules: ``eval.every_steps >= 0``, ``eval.batch_size >= 1``; with
    ``eval.reasoning_tasks`` set, ``eval.reasoning_examples``,
    ``eval.reasoning_max_new_tokens`` and ``eval.reasoning_batch_size`` >= 1,
    ``eval.reasoning_split`` a held-out split, and every task
    one that ``heldout_examples`` can build with ``eval.reasoning_task_config``
    (reasoning-gym installed, the name and the settings known).

    Args:
      cfg: the whole experiment config (reads ``cfg.eval``).

    Raises:
      mio_jax.config.ConfigError: naming the key.
    """
    e = cfg.eval
    if e.every_steps < 0:
        raise ConfigError(f"eval.every_steps={e.every_steps} must be >= 0 (0 = never)")
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size={e.batch_size} must be >= 1")
    tasks = reasoning_tasks(cfg)
    if not tasks:
        return
    for key in ("reasoning_examples", "reasoning_max_new_tokens", "reasoning_batch_size"):
        if e.get(key, 1) < 1:
            raise ConfigError(f"eval.{key}={e.get(key)} must be >= 1")
    if e.reasoning_split not in HELD_OUT_SPLITS:
        raise ConfigError(f"eval.reasoning_split={e.reasoning_split!r}: expected one of "
                          f"{list(HELD_OUT_SPLITS)}")
    try:
        task_config = parse_task_config(e.get("reasoning_task_config", ""))
    except ValueError as err:
        raise ConfigError(f"eval.reasoning_task_config: {err}") from err
    for task in tasks:
        try:
            heldout_examples(task, 1, 0, task_config)
        except (ValueError, ImportError) as err:
            raise ConfigError(f"eval.reasoning_tasks: {task!r}: {err}") from err
