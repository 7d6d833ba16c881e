"""Policy-gradient losses of the GRPO family and their advantages, as pure functions.

The semantics are those of TRL's `GRPOTrainer` (loss types, normalisations, the k3 KL
estimator, clip metrics) and `RLOOTrainer` (leave-one-out baseline), under TRL's
`GRPOConfig` names, so a TRL user reads the same knobs. Inputs are per-token arrays over
the completion positions only ([B, T], padding masked by `completion_mask`); nothing here
knows about models, rollouts or I/O. `jax.jit`, `jax.grad` and `jax.vmap` apply directly.

    loss, metrics = policy_loss("dapo", logps, old_logps, advantages, mask,
                                ref_per_token_logps=ref_logps, beta=0.04)
    advantages = group_advantages(rewards, num_generations=8, scale_rewards="group")

docs/rl.md has every formula; tests/losses/golden_trl_grpo.json holds TRL's own values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mio_jax.losses._common import compute_dtype, to_dtype

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
# loss types whose objective is the PPO-style clipped ratio (and whose clip metrics TRL logs)
CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# loss types normalised by the generation batch's completion-token count
TOKEN_COUNT_TYPES = ("dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
# TRL adds this to the standard deviation before dividing (group_advantages, RLOO's normalisation)
STD_EPS = 1e-4


def check_policy_loss_args(loss_type: str, importance_sampling_level: str) -> None:
    """Raises ValueError for an unknown loss type or level, or a combination TRL refuses."""
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"unknown policy loss_type {loss_type!r}; valid: {', '.join(POLICY_LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if loss_type == "luspo" and importance_sampling_level != "sequence":
        raise ValueError("loss_type 'luspo' needs importance_sampling_level='sequence' (as in TRL)")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """TRL's global masked mean: over unmasked tokens, or over rows for a [B, 1] value."""
    if x.shape[1] == 1:
        return x.sum() / x.shape[0]
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _row_means(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-row masked means ([B]); NaN for a row with no token, as in TRL's logging."""
    if x.shape[1] == 1:
        return x[:, 0]
    return (x * mask).sum(-1) / mask.sum(-1)


def policy_loss(
    loss_type: str,
    per_token_logps: jax.Array,
    old_per_token_logps: jax.Array | None,
    advantages: jax.Array,
    completion_mask: jax.Array,
    *,
    ref_per_token_logps: jax.Array | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    num_items_in_batch: Any = None,
    num_sequences: Any = None,
    entropies: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch loss of one GRPO-family objective and the metrics TRL logs for it.

    Args:
      loss_type: one of POLICY_LOSS_TYPES (TRL's `loss_type`).
      per_token_logps: [B, T] log-probs of the sampled completion tokens under the policy
        being trained (the only argument gradients flow through).
      old_per_token_logps: [B, T] the same under the policy that sampled them; None when
        the update is on-policy (one iteration), read as `stop_gradient(per_token_logps)`.
      advantages: [B] per completion (or [B, T] per token).
      completion_mask: [B, T] 1 for completion tokens that count, 0 for padding (and for a
        whole truncated completion under `mask_truncated_completions`).
      ref_per_token_logps: [B, T] reference log-probs; required when `beta != 0`.
      beta: weight of the k3 estimate of KL(policy || reference), per token.
      epsilon, epsilon_high: the ratio's lower and upper clip (epsilon_high defaults to
        epsilon); for cispo epsilon_high is the truncation of the (detached) ratio.
      delta: optional upper clamp of the unclipped ratio (two-sided clipping).
      importance_sampling_level: "token" (GRPO) or "sequence" (GSPO: one ratio per
        completion, the exp of the mean token log-ratio).
      max_completion_length: dr_grpo's constant normaliser (default: T).
      use_bias_correction_kl: multiply the KL term by the importance ratio (TRL's default).
      sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for positive and
        non-positive advantages.
      num_items_in_batch: dapo / cispo normaliser, the completion-token count of the whole
        generation batch (default: this batch's `completion_mask.sum()`).
      num_sequences: the completion count that per-completion means divide by (grpo, sapo,
        dr_grpo, luspo; default: B). Not a TRL knob: it lets a batch padded with fully
        masked rows, or one micro-batch of a larger step, give its exact share of the loss
        of the real completions (TRL's own batches are never padded).
      entropies: optional [B, T] per-token entropies, logged as `entropy`.

    Returns:
      (loss, metrics): the scalar loss of this batch and a dict of scalar metrics under
      TRL's names (`kl`, `entropy`, `clip_ratio/low_mean`, `clip_ratio/low_min`,
      `clip_ratio/high_mean`, `clip_ratio/high_max`, `clip_ratio/region_mean`,
      `cispo_clip_ratio`), each present where TRL logs it.
    """
    check_policy_loss_args(loss_type, importance_sampling_level)
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("`ref_per_token_logps` is required when beta != 0")
    dtype = compute_dtype(per_token_logps, old_per_token_logps, advantages, ref_per_token_logps)
    logps = to_dtype(per_token_logps, dtype)
    if logps.ndim != 2:
        raise ValueError(f"`per_token_logps` must be [B, T], got shape {tuple(logps.shape)}")
    old = jax.lax.stop_gradient(logps) if old_per_token_logps is None else to_dtype(old_per_token_logps, dtype)
    mask = to_dtype(completion_mask, dtype)
    adv = to_dtype(advantages, dtype)
    if adv.ndim == 1:
        adv = adv[:, None]
    for name, x in (("old_per_token_logps", old), ("completion_mask", mask)):
        if x.shape != logps.shape:
            raise ValueError(f"`{name}` has shape {tuple(x.shape)}, expected {tuple(logps.shape)}")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    log_ratio = logps - old
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:  # one weight per completion: the mean token log-ratio
        log_weights = ((log_ratio * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0))[:, None]
    coef_1 = jnp.exp(log_weights)

    metrics: dict[str, jax.Array] = {}
    if beta != 0.0:
        ref = to_dtype(ref_per_token_logps, dtype)
        per_token_kl = jnp.exp(ref - logps) - (ref - logps) - 1.0  # k3, >= 0
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if loss_type == "cispo":
        clamped = jax.lax.stop_gradient(jnp.minimum(coef_1, eps_high))
        per_token_loss = -clamped * adv * logps
    elif loss_type == "sapo":
        temperatures = jnp.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -jax.nn.sigmoid(temperatures * (coef_1 - 1.0)) * 4.0 / temperatures * adv
    else:
        coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
        if delta is not None:
            coef_1 = jnp.minimum(coef_1, delta)
        per_token_loss = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    rows = logps.shape[0] if num_sequences is None else to_dtype(num_sequences, dtype)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).sum() / rows
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    elif loss_type == "dr_grpo":
        length = logps.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token_loss * mask).sum() / (rows * length)
    elif loss_type in TOKEN_COUNT_TYPES:
        count = mask.sum() if num_items_in_batch is None else to_dtype(num_items_in_batch, dtype)
        loss = (per_token_loss * mask).sum() / jnp.maximum(count, 1.0)
    else:  # luspo: each completion's summed loss (a sequence-level term counts once per token)
        loss = (per_token_loss * mask).sum(-1).sum() / rows

    if beta != 0.0:
        metrics["kl"] = _masked_mean(per_token_kl, mask)
    if entropies is not None:
        metrics["entropy"] = _masked_mean(to_dtype(entropies, dtype), mask)
    if loss_type in CLIPPED_TYPES:
        low = ((coef_1 < 1.0 - eps_low) & (adv < 0)).astype(dtype)
        high = ((coef_1 > 1.0 + eps_high) & (adv > 0)).astype(dtype)
        metrics["clip_ratio/low_mean"] = _masked_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _masked_mean(jnp.maximum(low, high), mask)
        metrics["clip_ratio/low_min"] = jnp.nanmin(_row_means(low, mask))
        metrics["clip_ratio/high_max"] = jnp.nanmax(_row_means(high, mask))
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = _masked_mean(((coef_1 > eps_high) & (adv > 0)).astype(dtype), mask)
    return loss, metrics


def _nanstd(x: jax.Array, axis: int | None = None, keepdims: bool = False) -> jax.Array:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than 2 values)."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    variance = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    variance = jnp.where(count > 1, variance * count / jnp.maximum(count - 1, 1), jnp.nan)
    std = jnp.sqrt(variance)
    return std if keepdims else (std.squeeze() if axis is None else std.squeeze(axis))


def _grouped(rewards: Any, num_generations: int) -> jax.Array:
    r = jnp.asarray(rewards)
    r = r.astype(compute_dtype(r))
    if r.ndim != 1:
        raise ValueError(f"`rewards` must be [N] (one per completion), got shape {tuple(r.shape)}")
    if num_generations < 1 or r.shape[0] % num_generations:
        raise ValueError(f"{r.shape[0]} rewards do not split into groups of num_generations="
                         f"{num_generations}")
    return r.reshape(-1, num_generations)


def reward_std(rewards: Any, num_generations: int, scale_rewards: str = "group") -> jax.Array:
    """[N] the standard deviation each advantage is divided by: its group's (group, none)
    or the whole batch's (batch); 0 where a group has one completion."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = _grouped(rewards, num_generations)
    if scale_rewards == "batch":
        flat = grouped.reshape(-1)
        std = _nanstd(flat) if flat.size > 1 else jnp.zeros((), flat.dtype)
        return jnp.broadcast_to(std, flat.shape)
    if num_generations == 1:
        return jnp.zeros(grouped.size, grouped.dtype)
    return jnp.repeat(_nanstd(grouped, axis=1), num_generations)


def group_advantages(rewards: Any, num_generations: int, scale_rewards: str = "group") -> jax.Array:
    """GRPO's advantages: each reward minus its group's mean, divided by `reward_std` + 1e-4
    unless `scale_rewards` is "none".

    `rewards` is [N] with the `num_generations` completions of a prompt adjacent (TRL's
    order). A NaN reward (a completion no reward function could score) is left out of its
    group's statistics and gets advantage 0.
    """
    std = reward_std(rewards, num_generations, scale_rewards)  # (checks scale_rewards)
    grouped = _grouped(rewards, num_generations)
    mean = jnp.repeat(jnp.nanmean(grouped, axis=1), num_generations)
    advantages = grouped.reshape(-1) - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return jnp.nan_to_num(advantages, nan=0.0)


def rloo_advantages(rewards: Any, num_generations: int, normalize_advantages: bool = False) -> jax.Array:
    """RLOO's advantages: each reward minus the mean of its group's other rewards (TRL's
    `RLOOTrainer`; a KL penalty, if any, is subtracted from the rewards beforehand).

    With `normalize_advantages` the batch's advantages are standardised (NaN-aware, + 1e-4).
    NaN rewards are left out of their siblings' baselines and get advantage 0; a group of
    one completion has advantage 0.
    """
    grouped = _grouped(rewards, num_generations)
    if num_generations == 1:
        advantages = jnp.zeros(grouped.size, grouped.dtype)
    else:
        total = jnp.nansum(grouped, axis=1, keepdims=True)
        count = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True)
        advantages = (grouped - (total - grouped) / (count - 1)).reshape(-1)
    if normalize_advantages:
        advantages = (advantages - jnp.nanmean(advantages)) / (_nanstd(advantages) + STD_EPS)
    return jnp.nan_to_num(advantages, nan=0.0)


def reward_metrics(rewards: Any, num_generations: int, scale_rewards: str = "group") -> dict[str, jax.Array]:
    """TRL's per-batch reward log: `reward` and `reward_std` (NaN-aware mean and standard
    deviation of all the batch's rewards) and `frac_reward_zero_std` (the share of
    completions whose advantage divisor, `reward_std(...)`, is 0: no learning signal)."""
    flat = _grouped(rewards, num_generations).reshape(-1)
    std = reward_std(rewards, num_generations, scale_rewards)
    return {"reward": jnp.nanmean(flat),
            "reward_std": _nanstd(flat),
            "frac_reward_zero_std": jnp.mean(jnp.isclose(std, 0.0).astype(flat.dtype))}
