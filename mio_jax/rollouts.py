"""Rollout groups: a prompt with its G sampled completions, their rewards and advantages,
as the batches a policy-gradient round trains on.

A group keeps the tokens the sampler produced (the prompt's ids and each completion's ids,
end-of-sequence token included), so the log-probs a round trains with score exactly what
was sampled: no decode / re-encode round trip. Groups are batched in the unshared
``[B, G, L]`` layout (``layouts.PreferenceBatch`` with ``advantages``) or, with
``shared_prompt``, one row per group ``[B, T]`` holding the prompt once and the G
completions one after another (``layouts.SharedPromptBatch``: the prompt's tokens go
through the model once instead of G times, and completions of different lengths leave no
padding between them). The per-token tables (old policy, reference) are ``[N, G, X]``,
indexed as ``layouts.token_table`` places a token: X is L unshared, T shared. A completion
masked as truncated keeps its slot (it counts in the group's statistics and in the
per-completion mean, as in TRL) with no token in ``loss_mask``.

Which groups a step trains on depends only on (seed, round, step): iteration ``i`` of
``num_iterations`` is a permutation of the round's groups drawn from ``(seed, round, i)``,
cut into batches; so a resumed round needs no iterator state, and every process reads the
same global batch (each takes its contiguous share of the rows, as the data pipeline does).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mio_jax import layouts
from mio_jax.data import batching
from mio_jax.data import shared_prompt as shared_prompt_lib
from mio_jax.data.tokenize import TokenizedGroup
from mio_jax.losses import policy as policy_lib

LENGTH_MULTIPLE = 64  # padded lengths are rounded up to this (few distinct compilations)


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """One round's groups, ready to batch.

    Attributes:
      groups: N groups, each the prompt's ids and its G completions' ids.
      advantages: [N, G] float32.
      counted: [N, G] bool, completions whose tokens count in the loss (False for a
        truncated completion under ``mask_truncated_completions``).
      length: the padded length of every batch of the round: L (unshared), T (shared).
      shared_prompt: batches in the shared-prompt layout.
    """

    groups: list
    advantages: np.ndarray
    counted: np.ndarray
    length: int
    shared_prompt: bool = False

    @property
    def num_generations(self) -> int:
        return self.advantages.shape[1]


def padded_length(groups: Sequence[TokenizedGroup], min_length: int,
                  shared_prompt: bool = False) -> int:
    """The round's L (T with ``shared_prompt``: its longest group row): at least
    ``min_length``, enough for its longest sequence, rounded up to ``LENGTH_MULTIPLE``."""
    if shared_prompt:
        longest = max((shared_prompt_lib.shared_row_length(g.seq_lengths, len(g.prompt_ids))
                       for g in groups), default=1)
    else:
        longest = max((max(g.seq_lengths) for g in groups), default=1)
    need = max(int(min_length), longest)
    return -(-need // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


def group_rewards(samples: Sequence[dict]) -> np.ndarray:
    """[N * G] the combined reward of every completion, in group order (NaN: unscored)."""
    return np.asarray([np.nan if s["reward"] is None else s["reward"]
                       for p in samples for s in p["samples"]], np.float64)


def build(samples: Sequence[dict], *, scale_rewards: str, mask_truncated_completions: bool,
          drop_zero_std_groups: bool, min_length: int, advantage: str = "group",
          shared_prompt: bool = False) -> tuple[Rollouts, dict]:
    """The round's rollouts from its scored samples, and the round's rollout metrics.

    Args:
      samples: per prompt ``{"prompt_ids", "samples": [{"ids", "reward", "finish"}, ...]}``,
        G samples each.
      scale_rewards: TRL's group / batch / none (``losses.group_advantages``).
      mask_truncated_completions: completions that hit the token limit get no loss.
      drop_zero_std_groups: DAPO's dynamic sampling: leave out groups whose rewards are all
        equal (advantage 0: no signal); they are counted in ``groups_dropped``.
      min_length: the smallest padded length (the round's L is its longest sequence
        rounded up to ``LENGTH_MULTIPLE``: a few distinct compilations over a run).
      advantage: "group" (GRPO) or "rloo" (leave-one-out baseline).
      shared_prompt: batch the groups in the shared-prompt layout.

    Returns:
      ``(rollouts, metrics)``: TRL's ``reward``, ``reward_std``, ``frac_reward_zero_std``,
      ``completions/mean_length``, ``completions/min_length``, ``completions/max_length``,
      ``completions/clipped_ratio``, plus ``groups`` and ``groups_dropped``.
    """
    g = len(samples[0]["samples"])
    if any(len(p["samples"]) != g for p in samples):
        raise ValueError("every prompt of a rollout round needs the same number of samples")
    rewards = group_rewards(samples)
    if advantage == "group":
        adv = np.asarray(policy_lib.group_advantages(rewards, g, scale_rewards), np.float32)
    elif advantage == "rloo":
        adv = np.asarray(policy_lib.rloo_advantages(rewards, g), np.float32)
    else:
        raise ValueError(f"advantage must be 'group' or 'rloo', got {advantage!r}")
    adv = adv.reshape(-1, g)
    metrics = {k: float(v) for k, v in policy_lib.reward_metrics(rewards, g, scale_rewards).items()}
    lengths = np.asarray([len(s["ids"]) for p in samples for s in p["samples"]])
    clipped = np.asarray([s["finish"] == "length" for p in samples for s in p["samples"]])
    metrics.update({"completions/mean_length": float(lengths.mean()),
                    "completions/min_length": float(lengths.min()),
                    "completions/max_length": float(lengths.max()),
                    "completions/clipped_ratio": float(clipped.mean())})
    grouped = rewards.reshape(-1, g)
    keep = [i for i in range(len(samples))
            if not (drop_zero_std_groups and np.nanstd(grouped[i]) == 0)]
    metrics.update(groups=float(len(samples)), groups_dropped=float(len(samples) - len(keep)))
    groups = [TokenizedGroup(row_id=f"round_group[{i}]",
                             prompt_ids=np.asarray(samples[i]["prompt_ids"], np.int32),
                             completion_ids=tuple(np.asarray(s["ids"], np.int32)
                                                  for s in samples[i]["samples"]))
              for i in keep]
    counted = np.asarray([[not (mask_truncated_completions and s["finish"] == "length")
                           for s in samples[i]["samples"]] for i in keep], bool).reshape(-1, g)
    return Rollouts(groups, adv[keep], counted,
                    padded_length(groups, min_length, shared_prompt), shared_prompt), metrics


def steps_per_iteration(n_groups: int, batch_size: int) -> int:
    """Optimizer steps for one pass over the round's groups (the last batch padded)."""
    return -(-n_groups // batch_size)


def batch_ids(n_groups: int, batch_size: int, seed: int, r: int, j: int) -> np.ndarray:
    """[batch_size] the group ids of the round's step ``j`` (-1: padding)."""
    per = steps_per_iteration(n_groups, batch_size)
    iteration, b = divmod(j, per)
    order = np.random.default_rng([seed, r, iteration]).permutation(n_groups)
    ids = order[b * batch_size:(b + 1) * batch_size]
    return np.concatenate([ids, np.full(batch_size - len(ids), -1)]).astype(np.int64)


def in_order_ids(n_groups: int, batch_size: int, b: int) -> np.ndarray:
    """[batch_size] the ids of batch ``b`` of one unshuffled pass (-1: padding)."""
    ids = np.arange(b * batch_size, min((b + 1) * batch_size, n_groups))
    return np.concatenate([ids, np.full(batch_size - len(ids), -1)]).astype(np.int64)


def local_batch(rollouts: Rollouts, ids: np.ndarray, *, pad_id: int, process_index: int,
                process_count: int, old_logps: np.ndarray | None = None,
                ref_logps: np.ndarray | None = None) -> layouts.Batch:
    """This process's share (contiguous rows) of the global batch of groups ``ids``, with
    advantages and, when given, the per-token old-policy and reference log-probs
    (``[N, G, X]`` tables of the round, X = ``rollouts.length``), in the round's layout."""
    if len(ids) % process_count:
        raise ValueError(f"a batch of {len(ids)} groups does not split over {process_count} "
                         "processes")
    per = len(ids) // process_count
    mine = ids[process_index * per:(process_index + 1) * per]
    groups = [rollouts.groups[i] if i >= 0 else None for i in mine]
    g, x = rollouts.num_generations, rollouts.length
    real = mine >= 0
    take = np.where(real, mine, 0)

    def rows(table, shape_tail):
        out = np.zeros((len(mine), *shape_tail), np.float32)
        out[real] = table[take[real]]
        return out

    longest = max((max(grp.seq_lengths) for grp in groups if grp is not None), default=1)
    host = batching.collate(groups, mine, K=g, L=x if not rollouts.shared_prompt else longest,
                            pad_id=pad_id)
    host = host.replace(advantages=rows(rollouts.advantages, (g,)))
    counted = rows(rollouts.counted.astype(np.float32), (g,))
    if rollouts.shared_prompt:
        # convert before masking truncated completions (the layout reads each slot's span)
        host = shared_prompt_lib.to_shared_prompt(host, length=x, pad_id=pad_id)
        slot = np.maximum(host.slot_index, 0)
        keep = np.take_along_axis(counted, slot, axis=1) * (host.slot_index >= 0)
        host = host.replace(loss_mask=(host.loss_mask * keep).astype(np.int32))
    else:
        host = host.replace(loss_mask=(host.loss_mask * counted[..., None]).astype(np.int32))
    if old_logps is not None:
        host = host.replace(old_token_logps=rows(old_logps, (g, x)))
    if ref_logps is not None:
        host = host.replace(ref_token_logps=rows(ref_logps, (g, x)))
    return host


def fit_width(table: np.ndarray, x: int) -> np.ndarray:
    """A per-token table ``[N, G, W]`` at width ``x``. A token sits at its position in its
    unshared sequence in every layout, so a table computed in one layout serves another
    (a round resumed with ``data.shared_prompt`` switched): zeros are added, or columns
    dropped that hold no token.

    Raises:
      ValueError: a dropped column holds a value (the table is not the round's).
    """
    w = table.shape[-1]
    if w >= x:
        if np.any(table[..., x:]):
            raise ValueError(f"a per-token table of width {w} has values past this round's "
                             f"{x} positions: not this round's table")
        return table[..., :x]
    return np.concatenate([table, np.zeros((*table.shape[:-1], x - w), table.dtype)], axis=-1)
