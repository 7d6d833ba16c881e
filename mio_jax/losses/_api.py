"""Entry points: `compute` (pairs, [B]) and `compute_group` ([B, K]), plus weighted mixes."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mio_jax.losses._common import (
    Group,
    check_array,
    check_lengths_positive,
    compute_dtype,
    concrete_float,
    group_metrics,
    to_dtype,
)
from mio_jax.losses._registry import CRITIC_AVG_LOGP, PAIRWISE, LossSpec, spec

LossName = str | Sequence[str]


def _specs(name: LossName) -> list[LossSpec]:
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("an empty list of losses was given")
    if len(set(names)) != len(names):
        raise ValueError(f"loss names repeat in {names}; give each loss once with its weight")
    return [spec(n) for n in names]


def _route_hparams(specs: list[LossSpec], hparams: dict[str, Any]) -> list[dict[str, Any]]:
    """Each member gets its declared hparams: the caller's value, else the member's default."""
    for key in hparams:
        if not any(key in s.hparams for s in specs):
            accepted = {s.name: sorted(s.hparams) for s in specs}
            raise ValueError(
                f"unknown hparam {key!r} for loss {'+'.join(s.name for s in specs)}; "
                f"accepted hparams: {accepted}"
            )
    return [{k: hparams.get(k, default) for k, default in s.hparams.items()} for s in specs]


def _check_requirements(specs: list[LossSpec], has_ref: bool, lengths_bk: Any) -> None:
    for s in specs:
        if s.needs_reference and not has_ref:
            raise ValueError(
                f"loss {s.name!r} needs reference log-probs: pass ref_chosen_logps and "
                "ref_rejected_logps (ref_logps for compute_group)"
            )
        if s.needs_lengths != "none" and lengths_bk is None:
            what = "chosen_lengths" if s.needs_lengths == "chosen" else "chosen_lengths and rejected_lengths"
            raise ValueError(f"loss {s.name!r} needs completion lengths: pass {what} (lengths for compute_group)")


def _run(
    specs: list[LossSpec],
    *,
    policy_bk: jax.Array,
    ref_bk: jax.Array | None,
    lengths_bk: jax.Array | None,
    valid_bk: jax.Array,
    beta: Any,
    loss_weights: Sequence[float] | None,
    hparams: dict[str, Any],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    per_loss_hp = _route_hparams(specs, hparams)
    weighted = loss_weights is not None
    if loss_weights is None:
        loss_weights = [1.0] * len(specs)
    if len(loss_weights) != len(specs):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries for {len(specs)} losses")
    b = concrete_float(beta) if np.ndim(beta) == 0 else None
    if b is not None and not b > 0:
        raise ValueError(f"beta must be > 0, got {b}")

    dtype = compute_dtype(policy_bk, ref_bk)
    valid_bk = jnp.asarray(valid_bk, bool)
    # Absent completions hold arbitrary padding; zero them so no NaN/inf reaches a gradient.
    policy_bk = jnp.where(valid_bk, to_dtype(policy_bk, dtype), 0.0)
    ref_bk = None if ref_bk is None else jnp.where(valid_bk, to_dtype(ref_bk, dtype), 0.0)
    if lengths_bk is not None:
        lengths_bk = jnp.where(valid_bk, to_dtype(lengths_bk, dtype), 1.0)
    g = Group(policy_bk, ref_bk, lengths_bk, valid_bk, to_dtype(beta, dtype))

    total = None
    metrics: dict[str, jax.Array] = {}
    for s, hp, w in zip(specs, per_loss_hp, loss_weights):
        losses_b, extra = s.core(g, **hp)
        losses_b = losses_b.astype(dtype)
        metrics[f"loss/{s.name}"] = jax.lax.stop_gradient(losses_b)
        for k, v in extra.items():
            key = k if k not in metrics else f"{s.name}/{k}"
            metrics[key] = jax.lax.stop_gradient(v).astype(dtype)
        term = jnp.asarray(w, dtype) * losses_b if weighted else losses_b
        total = term if total is None else total + term

    first = specs[0]
    if first.critic == CRITIC_AVG_LOGP:
        critic_bk = g.beta * g.policy_bk / jnp.maximum(g.lengths_bk, 1.0)
    else:
        critic_bk = g.beta * g.logratio_bk
    sg = jax.lax.stop_gradient
    metrics.update(group_metrics(sg(critic_bk), Group(sg(g.policy_bk), None, None, g.valid_bk, sg(g.beta))))
    return total, metrics


def compute(
    name: LossName,
    *,
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    beta: Any,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    loss_weights: Sequence[float] | None = None,
    **hparams: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example preference loss on B (chosen, rejected) pairs.

    Args:
      name: a registered loss name, or a sequence of names for a weighted mix
        (TRL's `loss_type` list; the result is sum_i loss_weights[i] * loss_i).
      policy_chosen_logps: [B] policy log-prob SUMS over the chosen completion tokens.
      policy_rejected_logps: [B] same for the rejected completions.
      ref_chosen_logps: [B] reference log-prob sums, or None for reference-free losses.
      ref_rejected_logps: [B] likewise.
      beta: scalar > 0 (python float or 0-d array).
      chosen_lengths: [B] completion token counts (ints or floats), if the loss needs them.
      rejected_lengths: [B] likewise.
      loss_weights: one weight per name when `name` is a sequence (default all 1.0).
      **hparams: loss hyper-parameters (see `spec(name).hparams`); each goes to every
        mixed loss that declares it; a name no loss declares raises ValueError.

    Returns:
      (losses_b, metrics): losses_b [B] float32 (float64 for float64 inputs), whose mean is
      the batch loss; metrics a dict of [B] arrays (TRL names, see docs/losses.md).
    """
    specs = _specs(name)
    check_array("policy_chosen_logps", policy_chosen_logps, 1)
    (num_b,) = policy_chosen_logps.shape
    check_array("policy_rejected_logps", policy_rejected_logps, 1, (num_b,))
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    ref_bk = None
    if ref_chosen_logps is not None:
        check_array("ref_chosen_logps", ref_chosen_logps, 1, (num_b,))
        check_array("ref_rejected_logps", ref_rejected_logps, 1, (num_b,))
        ref_bk = jnp.stack([ref_chosen_logps, ref_rejected_logps], axis=1)
    lengths_bk = None
    if chosen_lengths is not None or rejected_lengths is not None:
        chosen_lengths = jnp.asarray(chosen_lengths if chosen_lengths is not None else np.ones(num_b))
        need_both = any(s.needs_lengths == "both" for s in specs)
        if rejected_lengths is None and need_both:
            raise ValueError(f"loss {'+'.join(s.name for s in specs)} needs rejected_lengths as well")
        rejected_lengths = jnp.asarray(rejected_lengths if rejected_lengths is not None else np.ones(num_b))
        check_array("chosen_lengths", chosen_lengths, 1, (num_b,))
        check_array("rejected_lengths", rejected_lengths, 1, (num_b,))
        check_lengths_positive("chosen_lengths", chosen_lengths)
        check_lengths_positive("rejected_lengths", rejected_lengths)
        lengths_bk = jnp.stack([chosen_lengths, rejected_lengths], axis=1)
    _check_requirements(specs, ref_bk is not None, lengths_bk)
    policy_bk = jnp.stack([policy_chosen_logps, policy_rejected_logps], axis=1)
    return _run(
        specs,
        policy_bk=policy_bk,
        ref_bk=ref_bk,
        lengths_bk=lengths_bk,
        valid_bk=jnp.ones((num_b, 2), bool),
        beta=beta,
        loss_weights=loss_weights,
        hparams=hparams,
    )


def compute_group(
    name: LossName,
    *,
    policy_logps: jax.Array,
    ref_logps: jax.Array | None = None,
    beta: Any,
    lengths: jax.Array | None = None,
    valid: jax.Array | None = None,
    loss_weights: Sequence[float] | None = None,
    **hparams: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-group loss on B groups of K completions; the trainer's single entry point.

    Args:
      name: loss name or sequence of names (as in `compute`).
      policy_logps: [B, K] policy log-prob sums; index 0 along K is the positive (chosen),
        the others negatives.
      ref_logps: [B, K] reference log-prob sums, or None for reference-free losses.
      beta: scalar > 0.
      lengths: [B, K] completion token counts, if the loss needs them.
      valid: [B, K] bool, True where the completion is present (default all True).
        Multi-negative losses exclude absent negatives; pairwise losses need K = 2 and
        every slot present. valid[:, 0] (the positive) must be True.
      loss_weights: weights of a mix, as in `compute`.
      **hparams: loss hyper-parameters, as in `compute`.

    Returns:
      (losses_b, metrics) as `compute`: losses [B], metrics a dict of [B] arrays.
    """
    specs = _specs(name)
    check_array("policy_logps", policy_logps, 2)
    num_b, num_k = policy_logps.shape
    if num_k < 2:
        raise ValueError(f"`policy_logps` has K = {num_k} completions per group; need K >= 2")
    pairwise = [s.name for s in specs if s.kind == PAIRWISE]
    if pairwise and num_k != 2:
        raise ValueError(f"pairwise loss(es) {pairwise} need K = 2, got policy_logps of shape {(num_b, num_k)}")
    if ref_logps is not None:
        check_array("ref_logps", ref_logps, 2, (num_b, num_k))
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        check_array("lengths", lengths, 2, (num_b, num_k))
    if valid is None:
        valid = jnp.ones((num_b, num_k), bool)
    else:
        valid = jnp.asarray(valid)
        check_array("valid", valid, 2, (num_b, num_k))
        try:
            valid_np = np.asarray(valid, bool)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            valid_np = None
        if valid_np is not None:
            if not valid_np[:, 0].all():
                raise ValueError(f"`valid[:, 0]` (the positive) is False in rows {np.where(~valid_np[:, 0])[0][:8].tolist()}")
            if pairwise and not valid_np.all():
                raise ValueError(f"pairwise loss(es) {pairwise} need every slot of `valid` True")
    if lengths is not None:
        check_lengths_positive("lengths", jnp.where(valid, lengths, 1))
    _check_requirements(specs, ref_logps is not None, lengths)
    return _run(
        specs,
        policy_bk=policy_logps,
        ref_bk=ref_logps,
        lengths_bk=lengths,
        valid_bk=valid,
        beta=beta,
        loss_weights=loss_weights,
        hparams=hparams,
    )
