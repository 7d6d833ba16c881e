"""Optimiser and learning-rate schedules (optax)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mio_jax.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                  schedule: str = "cosine", final_lr_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0, then cosine / linear decay or constant.

    Args:
      learning_rate: peak learning rate (reached after ``warmup_steps``).
      total_steps: optimizer steps of the whole run (decay ends there).
      warmup_steps: steps of linear warmup from 0 to ``learning_rate``.
      schedule: "cosine", "linear" or "constant" (after warmup).
      final_lr_fraction: learning rate at ``total_steps`` as a fraction of the peak.

    Returns:
      An optax schedule ``step -> lr``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0 (train.steps / train.epochs)")
    check_schedule(schedule=schedule, warmup_steps=warmup_steps)
    end_value = learning_rate * final_lr_fraction
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, decay_steps,
                                            alpha=final_lr_fraction)
    elif schedule == "linear":
        after = optax.linear_schedule(learning_rate, end_value, decay_steps)
    else:
        after = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def clip_norm(max_grad_norm) -> float | None:
    """The global-norm clip ``max_grad_norm`` stands for: None when unset or <= 0 (no clip)."""
    return None if max_grad_norm is None or max_grad_norm <= 0 else float(max_grad_norm)


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   schedule: str = "cosine", final_lr_fraction: float = 0.0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float | None = 1.0,
                   mu_dtype: str | None = None) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
    """AdamW with global-norm clipping and a warmup + decay schedule.

    Args:
      learning_rate, total_steps, warmup_steps, schedule, final_lr_fraction:
        see ``make_schedule``.
      weight_decay: decoupled AdamW weight decay (applied to every parameter).
      b1, b2, eps: Adam moments and epsilon.
      max_grad_norm: clip the global gradient norm to this (None or <= 0: no clip).
      mu_dtype: dtype of the first moment (None: the parameters' dtype); the
        second moment always follows the parameters (float32 master weights).

    Returns:
      ``(tx, schedule)``.
    """
    lr = make_schedule(learning_rate=learning_rate, total_steps=total_steps,
                       warmup_steps=warmup_steps, schedule=schedule,
                       final_lr_fraction=final_lr_fraction)
    parts = []
    if clip_norm(max_grad_norm) is not None:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None))
    return optax.chain(*parts), lr


def from_config(optim_cfg, total_steps: int):
    """Builds ``make_optimizer`` from the ``optim`` config section."""
    return make_optimizer(
        learning_rate=optim_cfg.learning_rate, total_steps=total_steps,
        warmup_steps=optim_cfg.warmup_steps, schedule=optim_cfg.schedule,
        final_lr_fraction=optim_cfg.final_lr_fraction, weight_decay=optim_cfg.weight_decay,
        b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
        max_grad_norm=optim_cfg.max_grad_norm, mu_dtype=optim_cfg.mu_dtype or None)


def check_schedule(*, schedule: str, warmup_steps: int, total_steps: int | None = None) -> None:
    """The schedule rules, in one place: a known schedule, warmup in [0, total steps].

    Args:
      schedule: ``optim.schedule``.
      warmup_steps: ``optim.warmup_steps``.
      total_steps: optimizer steps of the run, when known (None: not checked against).

    Raises:
      ValueError: naming the config key.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r}: expected one of {SCHEDULES}")
    if warmup_steps < 0 or (total_steps is not None and warmup_steps > total_steps):
        raise ValueError(f"optim.warmup_steps={warmup_steps} must be in "
                         f"[0, train.steps={total_steps}]")


def validate_optim_config(cfg) -> None:
    """Checks the ``optim`` section of a training config.

    Rules: ``check_schedule`` (warmup against ``train.steps`` unless ``train.epochs > 0``
    sets the step count from the data); ``optim.learning_rate > 0``;
    ``optim.final_lr_fraction`` in [0, 1]; ``optim.mu_dtype`` "" or a float dtype name.

    Args:
      cfg: the whole experiment config (reads ``cfg.optim`` and ``cfg.train``).

    Raises:
      mio_jax.config.ConfigError: naming the key.
    """
    o, t = cfg.optim, cfg.train
    try:
        check_schedule(schedule=o.schedule, warmup_steps=o.warmup_steps,
                       total_steps=None if t.epochs > 0 else t.steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if not o.learning_rate > 0:
        raise ConfigError(f"optim.learning_rate={o.learning_rate} must be > 0")
    if not 0.0 <= o.final_lr_fraction <= 1.0:
        raise ConfigError(f"optim.final_lr_fraction={o.final_lr_fraction} must be in [0, 1]")
    if o.mu_dtype not in ("", "float32", "bfloat16", "float16"):
        raise ConfigError(f"optim.mu_dtype={o.mu_dtype!r}: expected '' (like the params), "
                          "'float32', 'bfloat16' or 'float16'")
