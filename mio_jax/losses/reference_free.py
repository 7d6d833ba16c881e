"""Reference-free pairwise losses: SimPO and ORPO (no `ref_*` log-probs needed).

Both work on length-averaged policy log-probs a_w = logp_w / L_w, a_l = logp_l / L_l.
Reference log-probs, if passed, are ignored. Their metrics use TRL's CPO/ORPO
convention, critic T = beta * a (rewards/chosen = beta * a_w).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mio_jax.losses._common import Group, cdpo, chosen_nll_b, log_sigmoid
from mio_jax.losses._registry import CRITIC_AVG_LOGP, register

Out = tuple[jax.Array, dict[str, jax.Array]]

# log(1 - e^a) is -inf at a = 0 (every token certain); ORPO's average log-prob is
# capped just below 0 so the loss and its gradient stay finite there.
_ORPO_MAX_AVG_LOGP = -1e-6


@register(
    "simpo",
    needs_reference=False,
    needs_lengths="both",
    hparams={"simpo_gamma": 0.5, "label_smoothing": 0.0},
    trl_name="cpo:simpo",
    critic=CRITIC_AVG_LOGP,
    summary="-log s(b a_w - b a_l - gamma)  (SimPO; eps smooths as cDPO)",
)
def _simpo(g: Group, *, simpo_gamma: Any, label_smoothing: Any) -> Out:
    """SimPO (Meng et al. 2024): -log sigma(beta (a_w - a_l) - gamma), with TRL CPOTrainer's
    optional label smoothing. `simpo_gamma` is the margin gamma of the paper (TRL's name)."""
    a_w, a_l = g.pol_w / g.len_w, g.pol_l / g.len_l
    return cdpo(g.beta * (a_w - a_l) - simpo_gamma, label_smoothing), {}


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, switching form at -ln 2 to avoid cancellation."""
    safe_lo = jnp.minimum(x, -0.6931471805599453)
    safe_hi = jnp.clip(x, -0.6931471805599453, None)
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(safe_lo)), jnp.log(-jnp.expm1(safe_hi)))


@register(
    "orpo",
    needs_reference=False,
    needs_lengths="both",
    trl_name="orpo",
    critic=CRITIC_AVG_LOGP,
    summary="-b log s(log odds(a_w) - log odds(a_l)) + NLL_w  (ORPO; beta = lambda)",
)
def _orpo(g: Group) -> Out:
    """ORPO (Hong et al. 2024): NLL of the chosen completion plus lambda times the odds-ratio
    loss, lambda = beta (TRL's ORPOTrainer convention). log odds(a) = a - log(1 - e^a).

    The NLL term is the batch token-mean over chosen completion tokens (see
    `chosen_nll_b`); TRL's ORPOTrainer also counts prompt tokens in it, which
    per-sequence completion sums cannot express (documented in docs/losses.md).
    """
    a_w = jnp.minimum(g.pol_w / g.len_w, _ORPO_MAX_AVG_LOGP)
    a_l = jnp.minimum(g.pol_l / g.len_l, _ORPO_MAX_AVG_LOGP)
    log_odds = (a_w - a_l) - (_log1mexp(a_w) - _log1mexp(a_l))
    ratio = log_sigmoid(log_odds)
    nll = chosen_nll_b(g)
    extra = {"log_odds_ratio": ratio, "log_odds_chosen": log_odds, "nll_loss": nll}
    return nll - g.beta * ratio, extra
