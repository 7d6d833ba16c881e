"""Numerics shared by every loss: dtype policy, stable primitives, input checks.

Inputs of any float dtype are promoted to float32 for computation; float64
stays float64 (when JAX x64 is enabled). Every exponential of a critic value is
taken through `clipped_exp`, so losses stay finite for |beta * z| up to 1e4 and
beyond (the clip mirrors TRL's clamp at 80 in its alpha-divergence scores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Largest exponent fed to exp(): exp(80) ~ 5.5e34 is finite in float32 and leaves
# headroom for sums and products of a few such terms. TRL clamps at the same value.
EXP_CLIP = 80.0


def compute_dtype(*arrays: Any) -> jnp.dtype:
    """float64 if any input is float64, else float32 (bfloat16/float16 are promoted)."""
    for a in arrays:
        if a is not None and hasattr(a, "dtype") and jnp.dtype(a.dtype) == jnp.float64:
            return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def to_dtype(x: Any, dtype: jnp.dtype) -> jax.Array | None:
    """Casts `x` (array, Python number or None) to `dtype`; None passes through."""
    if x is None:
        return None
    return jnp.asarray(x).astype(dtype)


def log_sigmoid(x: jax.Array) -> jax.Array:
    """log sigma(x) = -softplus(-x), stable for any magnitude."""
    return -jax.nn.softplus(-x)


def softplus(x: jax.Array) -> jax.Array:
    """log(1 + e^x), stable for any magnitude."""
    return jax.nn.softplus(x)


def clipped_exp(x: jax.Array) -> jax.Array:
    """exp(min(x, EXP_CLIP)): finite for any input, exact below the clip."""
    return jnp.exp(jnp.minimum(x, EXP_CLIP))


def cdpo(margin_b: jax.Array, label_smoothing: Any) -> jax.Array:
    """Conservative-DPO form -(1-eps) log sigma(m) - eps log sigma(-m) of a scaled margin."""
    return -(1.0 - label_smoothing) * log_sigmoid(margin_b) - label_smoothing * log_sigmoid(-margin_b)


def concrete_float(x: Any) -> float | None:
    """The Python value of a scalar hparam, or None if it is traced under jit."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def check_array(name: str, x: Any, ndim: int, shape: tuple[int, ...] | None = None) -> None:
    """Raises ValueError naming `name` unless `x` is a float array of rank `ndim` (and `shape`)."""
    if x is None:
        raise ValueError(f"`{name}` is required but was None")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"`{name}` must be an array, got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"`{name}` must have rank {ndim}, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"`{name}` has shape {tuple(x.shape)}, expected {tuple(shape)}")


def check_lengths_positive(name: str, lengths: jax.Array) -> None:
    """When concrete, lengths must be >= 1 (a row with no completion token is a data bug)."""
    try:
        arr = np.asarray(lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if arr.size and arr.min() < 1:
        bad = np.argwhere(arr < 1)[:4].tolist()
        raise ValueError(f"`{name}` has entries < 1 (rows with no completion token) at indices {bad}")


@dataclasses.dataclass(frozen=True)
class Group:
    """Per-sequence quantities of B groups of K completions, index 0 the positive.

    Attributes:
      policy_bk: policy log-prob sums, [B, K].
      ref_bk: reference log-prob sums, [B, K], or None (reference-free use).
      lengths_bk: completion token counts as floats, [B, K], or None.
      valid_bk: bool mask of present completions, [B, K] (all True for pairs).
      beta: scalar temperature.
    """

    policy_bk: jax.Array
    ref_bk: jax.Array | None
    lengths_bk: jax.Array | None
    valid_bk: jax.Array
    beta: jax.Array

    @property
    def logratio_bk(self) -> jax.Array:
        """z = log pi_theta - log pi_ref ([B, K]); the reference counts as 0 when absent."""
        return self.policy_bk if self.ref_bk is None else self.policy_bk - self.ref_bk

    # Pair views (K == 2): chosen is index 0, rejected index 1.
    @property
    def z_w(self) -> jax.Array:
        return self.logratio_bk[:, 0]

    @property
    def z_l(self) -> jax.Array:
        return self.logratio_bk[:, 1]

    @property
    def pol_w(self) -> jax.Array:
        return self.policy_bk[:, 0]

    @property
    def pol_l(self) -> jax.Array:
        return self.policy_bk[:, 1]

    @property
    def ref_w(self) -> jax.Array:
        return self.ref_bk[:, 0]

    @property
    def ref_l(self) -> jax.Array:
        return self.ref_bk[:, 1]

    @property
    def len_w(self) -> jax.Array:
        """Chosen lengths clamped at 1 (TRL's clamp(min=1))."""
        return jnp.maximum(self.lengths_bk[:, 0], 1.0)

    @property
    def len_l(self) -> jax.Array:
        return jnp.maximum(self.lengths_bk[:, 1], 1.0)


def chosen_nll_b(g: Group) -> jax.Array:
    """Per-example chosen NLL whose batch mean is the batch token-mean NLL.

    l_b = -n * logp_w[b] / sum_b' L_w[b'], n = number of rows with L_w >= 1, so the mean of
    l_b over those rows is -sum logp_w / sum L_w: TRL's `sft` loss (mean over every chosen
    completion token of the batch). Without padding rows n = B and this is the plain
    batch mean; padding rows (L_w = 0, logp_w = 0) get l_b = 0 and a trainer that
    averages with zero weight on them still gets TRL's value exactly.
    """
    len_w = g.lengths_bk[:, 0]
    n_rows = jnp.sum(len_w >= 1).astype(len_w.dtype)
    total_tokens = jnp.maximum(jnp.sum(len_w), 1.0)
    return -n_rows * g.pol_w / total_tokens


def group_metrics(critic_bk: jax.Array, g: Group) -> dict[str, jax.Array]:
    """TRL-named metrics ([B] each) from the critic T ([B, K], index 0 the positive).

    `rewards/rejected`, `logps/rejected` average the valid negatives;
    `rewards/accuracies` is 1 where the positive beats every valid negative;
    `mi/dv` = T_pos - log mean_k e^{T_k} and `mi/js` = -sp(-T_pos) - mean_k sp(T_k),
    means over the valid completions (positive included), i.e. the DV and JS
    MI estimates of method.md section 6. At K = 2: mi/dv = log 2 - L_DPO, mi/js = -L_MIO.
    """
    valid = g.valid_bk
    neg = valid.at[:, 0].set(False)
    n_neg = jnp.maximum(jnp.sum(neg, axis=1), 1).astype(critic_bk.dtype)
    n_all = jnp.sum(valid, axis=1).astype(critic_bk.dtype)
    t_pos = critic_bk[:, 0]
    t_neg_mean = jnp.sum(jnp.where(neg, critic_bk, 0.0), axis=1) / n_neg
    t_neg_max = jnp.max(jnp.where(neg, critic_bk, -jnp.inf), axis=1)
    lse = jax.nn.logsumexp(jnp.where(valid, critic_bk, -jnp.inf), axis=1)
    mi_dv = t_pos - (lse - jnp.log(n_all))
    mi_js = -softplus(-t_pos) - jnp.sum(jnp.where(valid, softplus(critic_bk), 0.0), axis=1) / n_all
    logp_neg = jnp.sum(jnp.where(neg, g.policy_bk, 0.0), axis=1) / n_neg
    return {
        "rewards/chosen": t_pos,
        "rewards/rejected": t_neg_mean,
        "rewards/accuracies": (t_pos > t_neg_max).astype(critic_bk.dtype),
        "rewards/margins": t_pos - t_neg_mean,
        "logps/chosen": g.policy_bk[:, 0],
        "logps/rejected": logp_neg,
        "mi/dv": mi_dv,
        "mi/js": mi_js,
    }
