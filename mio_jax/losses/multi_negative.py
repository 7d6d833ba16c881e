"""Multi-negative MI losses (method.md section 6): one positive against K-1 negatives.

Critic T_k = beta * z_k for the K completions of a group, index 0 the positive;
Q is the uniform mix of the group's valid completions (positive included), so
every mean over k below runs over the n valid completions of the row.

| name     | loss                                   | bound | K = 2                |
|----------|----------------------------------------|-------|----------------------|
| infonce  | -T_0 + log mean_k e^{T_k}              | DV    | L_DPO - log 2        |
| js_multi | sp(-T_0) + mean_k sp(T_k)              | JS    | L_MIO (exactly)      |
| nwj      | -T_0 + e^{-1} mean_k e^{T_k}           | NWJ   | (a further bound)    |

Each loss is minus its MI estimate. NWJ's exponential goes through `clipped_exp`
(exponent capped at 80): the loss is then finite for any critic, but it is an
unbounded-variance estimator and large critics dominate it.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from mio_jax.losses._common import Group, clipped_exp, softplus
from mio_jax.losses._registry import MULTI_NEGATIVE, register

Out = tuple[jax.Array, dict[str, jax.Array]]


def _n_valid(g: Group, dtype: jnp.dtype) -> jax.Array:
    return jnp.sum(g.valid_bk, axis=1).astype(dtype)


@register(
    "infonce",
    kind=MULTI_NEGATIVE,
    summary="-T_0 + log mean_k e^{T_k}  (DV / InfoNCE; K=2: DPO - log 2)",
)
def _infonce(g: Group) -> Out:
    """InfoNCE / Donsker-Varadhan over a group: minus I_DV."""
    t = g.beta * g.logratio_bk
    lse = jax.nn.logsumexp(jnp.where(g.valid_bk, t, -jnp.inf), axis=1)
    return -t[:, 0] + lse - jnp.log(_n_valid(g, t.dtype)), {}


@register(
    "js_multi",
    kind=MULTI_NEGATIVE,
    summary="sp(-T_0) + mean_k sp(T_k)  (Jensen-Shannon; K=2: MIO)",
)
def _js_multi(g: Group) -> Out:
    """Jensen-Shannon MI loss over a group: minus I_JS; equals MIO at K = 2."""
    t = g.beta * g.logratio_bk
    mean_sp = jnp.sum(jnp.where(g.valid_bk, softplus(t), 0.0), axis=1) / _n_valid(g, t.dtype)
    return softplus(-t[:, 0]) + mean_sp, {}


@register(
    "nwj",
    kind=MULTI_NEGATIVE,
    summary="-T_0 + e^{-1} mean_k e^{T_k}  (NWJ / f-GAN KL bound)",
)
def _nwj(g: Group) -> Out:
    """Nguyen-Wainwright-Jordan bound over a group: minus I_NWJ (also logged as `mi/nwj`)."""
    t = g.beta * g.logratio_bk
    mean_exp = jnp.sum(jnp.where(g.valid_bk, clipped_exp(t - 1.0), 0.0), axis=1) / _n_valid(g, t.dtype)
    loss = -t[:, 0] + mean_exp
    return loss, {"mi/nwj": jax.lax.stop_gradient(-loss)}

