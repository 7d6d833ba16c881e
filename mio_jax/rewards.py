"""Reward functions for RL rounds: named, weighted, and callable the way TRL calls them.

A reward function scores a batch of completions:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

with TRL's `GRPOTrainer` keywords: `prompts` (each a list of chat messages), `completions`
(the answers' text), `completion_ids` (their token ids) and every column of the examples
as a list (`answer`, `task`, `metadata`, ..., and `verifier`, the example's verifier name).
None means "this function does not apply to this completion" (NaN in the table: left out
of that function's mean; a completion no function scores gets advantage 0).

Built in, by name (`online.reward_funcs`, comma separated, with `online.reward_weights`):

- "accuracy": each example's own verifier (`mio_jax.verifiers`), a score in [0, 1];
- "verifier:<name>": one named verifier for every example (e.g. "verifier:exact_number");
- "format": 1.0 when the answer is marked (`<answer>..</answer>`, `\\boxed{..}`, `#### ..`,
  "answer is .."), else 0.0;
- "think_format": TRL's `think_format_reward` (reasoning inside one `<think>..</think>`);
- "soft_overlong_punishment": DAPO's length penalty (arXiv 2503.14476, eq. 13), 0 up to
  `max_completion_length - soft_punish_cache` tokens, then linearly down to -1 at the limit;
- "module:function": any importable function with the signature above (a TRL reward
  function works unchanged).

Metrics use TRL's keys: `rewards/<name>/mean` and `rewards/<name>/std`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mio_jax import verifiers

RewardFn = Callable[..., list]
_THINK = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def accuracy(prompts, completions, completion_ids, *, verifier, **columns) -> list[float]:
    """Each completion scored by its example's verifier."""
    rows = _rows(columns, len(completions))
    return [float(verifiers.get(v)(c, ex)) for c, v, ex in zip(completions, verifier, rows)]


def format_reward(prompts, completions, completion_ids, **columns) -> list[float]:
    """1.0 for an answer the verifiers find by its marker, else 0.0."""
    return [0.0 if verifiers.marked_answer(c) is None else 1.0 for c in completions]


def think_format(prompts, completions, completion_ids, **columns) -> list[float]:
    """1.0 when the completion starts with one `<think>..</think>` block (TRL's rule)."""
    return [1.0 if _THINK.match(c) else 0.0 for c in completions]


@dataclasses.dataclass(frozen=True)
class SoftOverlongPunishment:
    """DAPO's soft overlong punishment over completion token counts."""

    max_completion_length: int
    soft_punish_cache: int

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        free = self.max_completion_length - self.soft_punish_cache
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= free:
                out.append(0.0)
            elif n <= self.max_completion_length:
                out.append((free - n) / self.soft_punish_cache)
            else:
                out.append(-1.0)
        return out


@dataclasses.dataclass(frozen=True)
class _Verifier:
    name: str

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        verify = verifiers.get(self.name)
        return [float(verify(c, ex)) for c, ex in zip(completions, _rows(columns, len(completions)))]


_BUILTIN = {"accuracy": accuracy, "format": format_reward, "think_format": think_format}
BUILTIN_NAMES = (*_BUILTIN, "soft_overlong_punishment", "verifier:<name>", "module:function")


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float


def _rows(columns: Mapping[str, Sequence], n: int) -> list[dict]:
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def _resolve(name: str, max_completion_length: int, soft_punish_cache: int) -> RewardFn:
    if name in _BUILTIN:
        return _BUILTIN[name]
    if name == "soft_overlong_punishment":
        if not 0 < soft_punish_cache <= max_completion_length:
            raise ValueError(f"reward 'soft_overlong_punishment' needs 0 < soft_punish_cache "
                             f"<= max_completion_length, got {soft_punish_cache} and "
                             f"{max_completion_length}")
        return SoftOverlongPunishment(max_completion_length, soft_punish_cache)
    if name.startswith("verifier:"):
        verifiers.get(name.partition(":")[2])  # raises for an unknown verifier
        return _Verifier(name.partition(":")[2])
    if ":" in name:
        return verifiers.import_callable(name, "reward")
    raise ValueError(f"unknown reward {name!r}; built in: {', '.join(BUILTIN_NAMES)}")


def parse(reward_funcs: str, reward_weights: str = "", *, max_completion_length: int,
          soft_punish_cache: int = 0) -> list[Reward]:
    """The rewards named in `reward_funcs` ("accuracy,format") with `reward_weights`
    ("1.0,0.1"; empty: every weight 1.0). Raises ValueError naming what is wrong."""
    names = [n.strip() for n in reward_funcs.split(",") if n.strip()]
    if not names:
        raise ValueError("reward_funcs is empty: name at least one reward (e.g. 'accuracy')")
    if len(set(names)) != len(names):
        raise ValueError(f"reward_funcs names a reward twice: {reward_funcs!r}")
    if reward_weights.strip():
        try:
            weights = [float(w) for w in reward_weights.split(",")]
        except ValueError as e:
            raise ValueError(f"reward_weights {reward_weights!r} is not a list of numbers") from e
        if len(weights) != len(names):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(names)} "
                             f"reward_funcs ({', '.join(names)})")
    else:
        weights = [1.0] * len(names)
    return [Reward(n, _resolve(n, max_completion_length, soft_punish_cache), w)
            for n, w in zip(names, weights)]


def score(rewards: Sequence[Reward], prompts: Sequence, completions: Sequence[str],
          completion_ids: Sequence[Sequence[int]], examples: Sequence[Mapping[str, Any]]
          ) -> np.ndarray:
    """[N, F] float64: function f's reward for completion n (NaN where it returned None).

    `examples[n]` is completion n's example (its columns become keyword lists)."""
    n = len(completions)
    if not (len(prompts) == len(completion_ids) == len(examples) == n):
        raise ValueError("prompts, completions, completion_ids and examples differ in length")
    keys = sorted({k for ex in examples for k in ex})
    columns = {k: [ex.get(k) for ex in examples] for k in keys}
    table = np.full((n, len(rewards)), np.nan)
    for j, reward in enumerate(rewards):
        values = reward.fn(prompts=list(prompts), completions=list(completions),
                           completion_ids=[list(x) for x in completion_ids], **columns)
        if len(values) != n:
            raise ValueError(f"reward {reward.name!r} returned {len(values)} values for {n} "
                             "completions")
        table[:, j] = [np.nan if v is None else float(v) for v in values]
    return table


def combine(table: np.ndarray, rewards: Sequence[Reward]) -> np.ndarray:
    """[N] the weighted sum over functions (missing values skipped); NaN where no function
    scored the completion (TRL's rule: such a completion gets advantage 0)."""
    weights = np.asarray([r.weight for r in rewards], np.float64)
    total = np.nansum(table * weights[None, :], axis=1)
    return np.where(np.isnan(table).all(axis=1), np.nan, total)


def metrics(table: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """`rewards/<name>/mean` and `/std` of each function (column ``j`` of ``table`` is
    ``names[j]``'s) over the completions it scored (standard deviation with Bessel's
    correction, as TRL's)."""
    out = {}
    for j, name in enumerate(names):
        col = table[:, j][~np.isnan(table[:, j])]
        out[f"rewards/{name}/mean"] = float(col.mean()) if col.size else float("nan")
        out[f"rewards/{name}/std"] = float(col.std(ddof=1)) if col.size > 1 else float("nan")
    return out
