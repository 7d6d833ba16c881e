"""f-divergence scores (f-DPO, Wang et al. 2023) as TRL's `f_divergence_type` applies them.

A log-ratio r = log pi_theta - log pi_ref is mapped to a score s = f'(e^r) (up to
constants that cancel in chosen - rejected differences, exactly as TRL writes them):

| f_divergence_type  | score s(r)                                   |
|--------------------|----------------------------------------------|
| reverse_kl         | r  (standard DPO)                            |
| forward_kl         | 1 - exp(-r)                                  |
| js_divergence      | log 2 + log sigma(r)                         |
| alpha_divergence   | (exp((a-1) r) - 1) / (a-1), a = f_alpha_divergence_coef; |a-1| < 1e-6 gives r |

Exponents are clipped at 80 (TRL clamps (a-1) r at 80 for float32 too); forward_kl's
exp(-r) goes through the same clip so scores stay finite for very negative r.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from mio_jax.losses._common import clipped_exp, log_sigmoid

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Hparams (with TRL's defaults) of every loss TRL lets f_divergence_type modify.
F_DIVERGENCE_HPARAMS = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}


def f_divergence_scores(
    logratio: jax.Array, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: Any = 0.5
) -> jax.Array:
    """Maps log-ratios to f-divergence scores.

    Args:
      logratio: log pi_theta - log pi_ref, any shape.
      f_divergence_type: one of `F_DIVERGENCE_TYPES` (a Python string: static under jit).
      f_alpha_divergence_coef: alpha of the alpha-divergence (a Python float).

    Returns:
      Scores, same shape and dtype as `logratio`.
    """
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return 1.0 - clipped_exp(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + log_sigmoid(logratio)
    if f_divergence_type == "alpha_divergence":
        alpha = float(f_alpha_divergence_coef)
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        return (clipped_exp((alpha - 1.0) * logratio) - 1.0) / (alpha - 1.0)
    raise ValueError(
        f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCE_TYPES)}"
    )


def pair_scores(g: Any, hp: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    """(s_w, s_l) for a pair group `g` under the hparams' f-divergence."""
    kind = hp.get("f_divergence_type", "reverse_kl")
    alpha = hp.get("f_alpha_divergence_coef", 0.5)
    return (
        f_divergence_scores(g.z_w, kind, alpha),
        f_divergence_scores(g.z_l, kind, alpha),
    )


