"""The GRPO family's closed forms, edge cases and errors (TRL parity: test_policy_golden_trl)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mio_jax.losses as L

pytestmark = pytest.mark.usefixtures("x64")


def _batch(seed=0, b=4, t=6, lengths=(6, 3, 1, 5)):
    rng = np.random.default_rng(seed)
    logps = jnp.asarray(rng.uniform(-3, -0.1, (b, t)))
    mask = jnp.asarray((np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.float64))
    adv = jnp.asarray(rng.normal(size=b))
    return logps, mask, adv


def test_on_policy_grpo_gradient_is_minus_the_advantage_over_the_row_length():
    # at ratio 1 no clip binds: d/dlogp_it of -(1/B) sum_i (1/|o_i|) sum_t A_i r_it = -A_i/(B|o_i|)
    logps, mask, adv = _batch()
    grad = jax.grad(lambda x: L.policy_loss("grpo", x, None, adv, mask)[0])(logps)
    lengths = mask.sum(1, keepdims=True)
    np.testing.assert_allclose(grad, -adv[:, None] * mask / lengths / 4, rtol=1e-14, atol=1e-15)
    # and the loss itself is -mean(A) (each row's ratios are 1)
    np.testing.assert_allclose(L.policy_loss("grpo", logps, None, adv, mask)[0], -adv.mean(), rtol=1e-14)


def test_dapo_and_bnpo_weigh_every_token_alike():
    logps, mask, adv = _batch(1)
    grad = jax.grad(lambda x: L.policy_loss("dapo", x, None, adv, mask)[0])(logps)
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=1e-14, atol=1e-15)
    # num_items_in_batch: the generation batch's token count replaces this batch's
    half = jax.grad(lambda x: L.policy_loss("dapo", x, None, adv, mask,
                                            num_items_in_batch=2 * mask.sum())[0])(logps)
    np.testing.assert_allclose(half, grad / 2, rtol=1e-14, atol=1e-15)
    bnpo = jax.grad(lambda x: L.policy_loss("bnpo", x, None, adv, mask)[0])(logps)
    np.testing.assert_allclose(bnpo, grad, rtol=1e-14, atol=1e-15)


def test_kl_term_is_k3_and_zero_at_the_reference():
    logps, mask, adv = _batch(2)
    _, m = L.policy_loss("grpo", logps, None, adv, mask, ref_per_token_logps=logps, beta=0.1)
    assert float(m["kl"]) == 0.0
    ref = logps - 0.3
    _, m = L.policy_loss("grpo", logps, None, adv, mask, ref_per_token_logps=ref, beta=0.1)
    np.testing.assert_allclose(m["kl"], math.exp(-0.3) + 0.3 - 1, rtol=1e-13)


def test_clip_ratios_count_tokens_outside_the_trust_region():
    # one row, 4 tokens, ratios 0.5, 0.9, 1.1, 1.5; advantage +1 clips only above 1 + eps
    logps = jnp.zeros((1, 4))
    old = -jnp.log(jnp.asarray([[0.5, 0.9, 1.1, 1.5]]))
    mask = jnp.ones((1, 4))
    _, m = L.policy_loss("grpo", logps, old, jnp.asarray([1.0]), mask, epsilon=0.2)
    assert float(m["clip_ratio/high_mean"]) == 0.25 and float(m["clip_ratio/low_mean"]) == 0.0
    _, m = L.policy_loss("grpo", logps, old, jnp.asarray([-1.0]), mask, epsilon=0.2)
    assert float(m["clip_ratio/low_mean"]) == 0.25 and float(m["clip_ratio/region_mean"]) == 0.25
    _, m = L.policy_loss("cispo", logps, old, jnp.asarray([1.0]), mask, epsilon_high=1.0)
    assert float(m["cispo_clip_ratio"]) == 0.5


@pytest.mark.parametrize("loss_type", L.POLICY_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_a_fully_masked_row_gives_finite_values_and_no_gradient(loss_type, level):
    if loss_type == "luspo" and level == "token":
        pytest.skip("luspo is sequence-level only")
    logps, mask, adv = _batch(3, lengths=(6, 0, 2, 4))
    old = logps + 0.2
    ref = logps - 0.1

    def f(x):
        return L.policy_loss(loss_type, x, old, adv, mask, ref_per_token_logps=ref, beta=0.04,
                             importance_sampling_level=level)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logps)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0.0)


def test_jit_and_float32():
    logps, mask, adv = _batch(4)
    f = jax.jit(L.policy_loss, static_argnames=("loss_type", "importance_sampling_level"))
    loss, _ = f("dapo", logps.astype(jnp.float32), None, adv.astype(jnp.float32), mask,
                importance_sampling_level="token")
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, L.policy_loss("dapo", logps, None, adv, mask)[0], rtol=1e-6)


def test_group_and_rloo_advantages_by_hand():
    r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = 0.5 / (math.sqrt(4 * 0.25 / 3) + 1e-4)  # Bessel-corrected std of (1, 0, 0, 1)
    np.testing.assert_allclose(L.group_advantages(r, 4, "group"), [a, -a, -a, a, 0, 0, 0, 0],
                               rtol=1e-14)
    np.testing.assert_allclose(L.group_advantages(r, 4, "none"), [.5, -.5, -.5, .5, 0, 0, 0, 0])
    batch_std = float(np.std(np.asarray(r), ddof=1))
    np.testing.assert_allclose(L.group_advantages(r, 4, "batch")[:2],
                               [0.5 / (batch_std + 1e-4), -0.5 / (batch_std + 1e-4)], rtol=1e-14)
    m = L.reward_metrics(r, 4, "group")
    assert float(m["frac_reward_zero_std"]) == 0.5 and float(m["reward"]) == 0.75
    # leave-one-out: 1 - (0 + 0 + 1)/3, 0 - (1 + 0 + 1)/3
    np.testing.assert_allclose(L.rloo_advantages(r, 4)[:4], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-14)
    np.testing.assert_allclose(L.rloo_advantages(r, 4)[4:], 0.0)


def test_bad_arguments_are_named():
    logps, mask, adv = _batch()
    with pytest.raises(ValueError, match="unknown policy loss_type 'ppo'.*grpo"):
        L.policy_loss("ppo", logps, None, adv, mask)
    with pytest.raises(ValueError, match="luspo.*sequence"):
        L.policy_loss("luspo", logps, None, adv, mask)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        L.policy_loss("grpo", logps, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="completion_mask"):
        L.policy_loss("grpo", logps, None, adv, mask[:, :3])
    with pytest.raises(ValueError, match="num_generations=4"):
        L.group_advantages(jnp.ones(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        L.group_advantages(jnp.ones(8), 4, "std")
