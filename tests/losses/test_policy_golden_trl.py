"""Parity of the GRPO family with TRL 1.16's own code (golden numbers from
scripts/golden_trl_grpo.py, float64).

Per loss case: TRL's loss, the gradient of it with respect to the per-token log-probs
(torch autograd through TRL's `_compute_loss`), and every metric TRL logged. Per reward
case: GRPO's advantages for each `scale_rewards` with TRL's reward log, and RLOO's
leave-one-out advantages. Inputs are rounded to 4 decimals, so both sides compute in
float64 from the same numbers: the tolerance is float64 rounding over a few dozen
operations (1e-12 relative, with an absolute floor of 1e-12 for values that are zero).
Three of TRL's figures pass through float32 on the way, and are compared to one float32
rounding (1.2e-7 relative): the clip-ratio metrics (means of `.float()` indicators, and a
float32 row count at the sequence level), and whatever uses TRL's `nanstd`, whose Bessel
factor `count / (count - 1)` divides two integer tensors (float32).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mio_jax.losses as L

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden_trl_grpo.json").read_text())
INPUTS = GOLDEN["inputs"]
TOL = dict(rtol=1e-12, atol=1e-12)
TRL_F32 = dict(rtol=1.2e-7, atol=1e-12)
pytestmark = pytest.mark.usefixtures("x64")


def _hparams(case):
    h = dict(case["hparams"])
    h.setdefault("max_completion_length", GOLDEN["defaults"]["max_completion_length"])
    return h


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["id"] for c in GOLDEN["cases"]])
def test_loss_gradient_and_metrics_equal_trl(case):
    x = {k: jnp.asarray(v, jnp.float64) for k, v in INPUTS.items()}
    old = None if case["on_policy"] else x["old_per_token_logps"]

    def loss_fn(logps):
        return L.policy_loss(case["loss_type"], logps, old, x["advantages"], x["completion_mask"],
                             ref_per_token_logps=x["ref_per_token_logps"], entropies=x["entropies"],
                             **_hparams(case))

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(x["per_token_logps"])
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), case["loss"], **TOL)
    np.testing.assert_allclose(np.asarray(grad), case["grad_per_token_logps"], **TOL)
    assert set(metrics) == set(case["metrics"])
    for key, value in case["metrics"].items():
        tol = TRL_F32 if "clip_ratio" in key else TOL
        np.testing.assert_allclose(float(metrics[key]), value, **tol, err_msg=key)


def _rewards(key):
    return jnp.asarray([np.nan if r is None else r for r in GOLDEN["rewards"][key]], jnp.float64)


@pytest.mark.parametrize("case", GOLDEN["advantages"],
                         ids=[f"{c['rewards']}-{c['scale_rewards']}" for c in GOLDEN["advantages"]])
def test_group_advantages_and_reward_log_equal_trl(case):
    r, g, scale = _rewards(case["rewards"]), case["num_generations"], case["scale_rewards"]
    np.testing.assert_allclose(np.asarray(L.group_advantages(r, g, scale)), case["advantages"],
                               **(TOL if scale == "none" else TRL_F32))
    logged = L.reward_metrics(r, g, scale)
    np.testing.assert_allclose(float(logged["reward"]), case["metrics"]["reward"], **TOL)
    for key in ("reward_std", "frac_reward_zero_std"):
        np.testing.assert_allclose(float(logged[key]), case["metrics"][key], **TRL_F32, err_msg=key)


@pytest.mark.parametrize("case", GOLDEN["rloo"],
                         ids=[f"{c['rewards']}-{c['normalize_advantages']}" for c in GOLDEN["rloo"]])
def test_rloo_advantages_equal_trl(case):
    got = L.rloo_advantages(_rewards(case["rewards"]), case["num_generations"],
                            normalize_advantages=case["normalize_advantages"])
    np.testing.assert_allclose(np.asarray(got), case["advantages"],
                               **(TRL_F32 if case["normalize_advantages"] else TOL))
