"""Exact checks from method.md section 4 and closed forms of the non-TRL losses (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mio_jax.losses as L

LN2, LN4 = math.log(2.0), math.log(4.0)


def _pair(z_w, z_l, dtype=jnp.float64, ref=(-10.0, -20.0)):
    z_w, z_l = jnp.asarray(z_w, dtype), jnp.asarray(z_l, dtype)
    rw = jnp.full(z_w.shape, ref[0], dtype)
    rl = jnp.full(z_l.shape, ref[1], dtype)
    return dict(policy_chosen_logps=rw + z_w, policy_rejected_logps=rl + z_l, ref_chosen_logps=rw, ref_rejected_logps=rl)


def _grad_z(fn, beta, z_w, z_l):
    """(dL/dz_w, dL/dz_l) of a single pair via jax.grad through the policy log-probs."""

    def loss(zw, zl):
        return fn(**_pair(zw[None], zl[None]), beta=beta)[0][0]

    return jax.grad(loss, argnums=(0, 1))(jnp.float64(z_w), jnp.float64(z_l))


@pytest.mark.usefixtures("x64")
def test_values_at_zero():
    for beta in (0.1, 1.0, 3.0):
        assert float(L.mio(**_pair([0.0], [0.0]), beta=beta)[0][0]) == pytest.approx(LN4, rel=1e-15)
        assert float(L.dpo(**_pair([0.0], [0.0]), beta=beta)[0][0]) == pytest.approx(LN2, rel=1e-15)
        assert float(L.sigmoid(**_pair([0.0], [0.0]), beta=beta)[0][0]) == pytest.approx(LN2, rel=1e-15)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_gradients_at_zero(beta):
    gw, gl = _grad_z(L.mio, beta, 0.0, 0.0)
    assert (float(gw), float(gl)) == pytest.approx((-beta / 4, beta / 4), rel=1e-14)
    gw, gl = _grad_z(L.dpo, beta, 0.0, 0.0)
    assert (float(gw), float(gl)) == pytest.approx((-beta / 2, beta / 2), rel=1e-14)
    # Gradient-matched temperatures: DPO at beta/2 starts exactly like MIO at beta.
    gw_d, gl_d = _grad_z(L.dpo, beta / 2, 0.0, 0.0)
    gw_m, gl_m = _grad_z(L.mio, beta, 0.0, 0.0)
    assert (float(gw_d), float(gl_d)) == pytest.approx((float(gw_m), float(gl_m)), rel=1e-14)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_mio_chosen_gradient_vanishes_at_ln2(beta):
    z_star = LN2 / beta
    gw, _ = _grad_z(L.mio, beta, z_star, -3.0)
    assert abs(float(gw)) < 1e-15
    below, _ = _grad_z(L.mio, beta, z_star - 1.0, -3.0)
    above, _ = _grad_z(L.mio, beta, z_star + 1.0, -3.0)
    assert float(below) < 0 < float(above)  # descent pushes z_w towards ln2/beta from both sides


@pytest.mark.usefixtures("x64")
def test_gradient_formulas_of_method_md():
    rng = np.random.default_rng(0)
    for _ in range(5):
        beta, zw, zl = rng.uniform(0.05, 2.0), rng.normal(0, 3), rng.normal(0, 3)
        sig = lambda u: 1.0 / (1.0 + math.exp(-u))  # noqa: E731
        gw, gl = _grad_z(L.dpo, beta, zw, zl)
        w = beta * sig(-beta * (zw - zl))
        assert (float(gw), float(gl)) == pytest.approx((-w, w), rel=1e-12)
        gw, gl = _grad_z(L.mio, beta, zw, zl)
        assert (float(gw), float(gl)) == pytest.approx((-beta * (1 - 1.5 * sig(beta * zw)), 0.5 * beta * sig(beta * zl)), rel=1e-12)


@pytest.mark.usefixtures("x64")
def test_mi_metrics_are_minus_the_losses():
    p = _pair([-1.5, 0.0, 2.0, 7.0], [0.5, 0.0, -1.0, 9.0])
    l_mio, m = L.mio(**p, beta=0.3)
    l_dpo, _ = L.dpo(**p, beta=0.3)
    np.testing.assert_allclose(m["mi/js"], -l_mio, rtol=1e-14)
    np.testing.assert_allclose(m["mi/dv"], LN2 - l_dpo, rtol=1e-13, atol=1e-15)
    # Every loss reports the same critic-based estimates (runs stay comparable).
    _, m_ipo = L.ipo(**p, beta=0.3, chosen_lengths=jnp.ones(4), rejected_lengths=jnp.ones(4))
    np.testing.assert_allclose(m_ipo["mi/js"], m["mi/js"], rtol=1e-15)
    np.testing.assert_allclose(m["rewards/chosen"], 0.3 * jnp.asarray([-1.5, 0.0, 2.0, 7.0]), rtol=1e-14)
    np.testing.assert_array_equal(m["rewards/accuracies"], [0.0, 0.0, 1.0, 0.0])


@pytest.mark.usefixtures("x64")
def test_multi_negative_reduce_at_k2():
    rng = np.random.default_rng(1)
    pol, ref = jnp.asarray(rng.normal(-30, 5, (6, 2))), jnp.asarray(rng.normal(-30, 5, (6, 2)))
    pair = dict(policy_chosen_logps=pol[:, 0], policy_rejected_logps=pol[:, 1], ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1])
    beta = 0.2
    l_info, _ = L.compute_group("infonce", policy_logps=pol, ref_logps=ref, beta=beta)
    l_js, m_js = L.compute_group("js_multi", policy_logps=pol, ref_logps=ref, beta=beta)
    l_dpo, m_dpo = L.dpo(**pair, beta=beta)
    l_mio, _ = L.mio(**pair, beta=beta)
    np.testing.assert_allclose(l_info, l_dpo - LN2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(l_js, l_mio, rtol=1e-14)
    for key in m_dpo:
        if not key.startswith("loss/"):
            np.testing.assert_allclose(m_js[key], m_dpo[key], rtol=1e-14, err_msg=key)
    # NWJ closed form at K = 2.
    l_nwj, m_nwj = L.compute_group("nwj", policy_logps=pol, ref_logps=ref, beta=beta)
    t = beta * (pol - ref)
    np.testing.assert_allclose(l_nwj, -t[:, 0] + math.exp(-1) * jnp.mean(jnp.exp(t), axis=1), rtol=1e-13)
    np.testing.assert_allclose(m_nwj["mi/nwj"], -l_nwj, rtol=1e-15)


@pytest.mark.usefixtures("x64")
def test_multi_negative_masking_equals_dropping_columns():
    rng = np.random.default_rng(2)
    pol, ref = jnp.asarray(rng.normal(-30, 5, (3, 4))), jnp.asarray(rng.normal(-30, 5, (3, 4)))
    valid = jnp.asarray([[True, True, True, True], [True, False, True, False], [True, True, False, False]])
    garbage_pol = jnp.where(valid, pol, jnp.nan)  # absent slots may hold anything
    for name in ("infonce", "js_multi", "nwj"):
        got, m = L.compute_group(name, policy_logps=garbage_pol, ref_logps=ref, beta=0.3, valid=valid)
        for b in range(3):
            keep = np.asarray(valid[b])
            want, mb = L.compute_group(name, policy_logps=pol[b : b + 1, keep], ref_logps=ref[b : b + 1, keep], beta=0.3)
            np.testing.assert_allclose(got[b], want[0], rtol=1e-13, err_msg=name)
            np.testing.assert_allclose(m["mi/dv"][b], mb["mi/dv"][0], rtol=1e-13)
        g = jax.grad(lambda p: L.compute_group(name, policy_logps=p, ref_logps=ref, beta=0.3, valid=valid)[0].sum())(garbage_pol)
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~np.asarray(valid)] == 0.0)
    # Closed form of InfoNCE for K = 4 (row 0).
    t = 0.3 * (pol[0] - ref[0])
    want = float(-t[0] + math.log(np.mean(np.exp(np.asarray(t)))))
    got, _ = L.compute_group("infonce", policy_logps=pol, ref_logps=ref, beta=0.3, valid=valid)
    assert float(got[0]) == pytest.approx(want, rel=1e-13)


@pytest.mark.usefixtures("x64")
def test_simpo_and_orpo_published_formulas():
    pw, pl = jnp.asarray([-12.0, -40.0, -3.0]), jnp.asarray([-20.0, -35.0, -9.0])
    lw, ll = jnp.asarray([4, 10, 3]), jnp.asarray([5, 7, 9])
    beta, gamma = 2.0, 0.8
    got, m = L.simpo(policy_chosen_logps=pw, policy_rejected_logps=pl, beta=beta, chosen_lengths=lw, rejected_lengths=ll, simpo_gamma=gamma)
    aw, al = np.asarray(pw / lw), np.asarray(pl / ll)
    want = np.log1p(np.exp(-(beta * aw - beta * al - gamma)))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    np.testing.assert_allclose(m["rewards/chosen"], beta * aw, rtol=1e-15)
    lam = 0.25
    got, m = L.orpo(policy_chosen_logps=pw, policy_rejected_logps=pl, beta=lam, chosen_lengths=lw, rejected_lengths=ll)
    odds = lambda a: np.exp(a) / (1 - np.exp(a))  # noqa: E731  (Hong et al. 2024, eq. 4)
    log_or = np.log(odds(aw) / odds(al))
    nll = -3 * np.asarray(pw) / float(np.sum(lw))  # batch token-mean NLL, spread per example
    np.testing.assert_allclose(got, nll - lam * np.log(1 / (1 + np.exp(-log_or))), rtol=1e-12)
    assert float(jnp.mean(got)) == pytest.approx(-float(jnp.sum(pw)) / float(jnp.sum(lw)) + float(np.mean(lam * np.log1p(np.exp(-log_or)))), rel=1e-12)


@pytest.mark.usefixtures("x64")
def test_sft_is_batch_token_mean_and_rpo_is_sigmoid_plus_sft():
    p = _pair([0.3, -1.0, 2.0], [0.0, 0.5, -2.0])
    lw, ll = jnp.asarray([3, 10, 7]), jnp.asarray([2, 2, 2])
    got, _ = L.sft(**p, beta=0.1, chosen_lengths=lw)
    assert float(jnp.mean(got)) == pytest.approx(-float(jnp.sum(p["policy_chosen_logps"])) / 20.0, rel=1e-15)
    rpo, _ = L.rpo(**p, beta=0.1, chosen_lengths=lw, rpo_alpha=0.7)
    mix, mm = L.compute(("sigmoid", "sft"), **p, beta=0.1, chosen_lengths=lw, rejected_lengths=ll, loss_weights=(1.0, 0.7))
    np.testing.assert_allclose(rpo, mix, rtol=1e-14)
    np.testing.assert_allclose(mix, mm["loss/sigmoid"] + 0.7 * mm["loss/sft"], rtol=1e-15)
    # sft needs no reference.
    ref_free, _ = L.sft(policy_chosen_logps=p["policy_chosen_logps"], policy_rejected_logps=p["policy_rejected_logps"], beta=0.1, chosen_lengths=lw)
    np.testing.assert_allclose(ref_free, got, rtol=1e-15)


@pytest.mark.usefixtures("x64")
def test_bco_delta_shift_and_cdpo():
    p = _pair([0.3, -1.0], [0.0, 0.5])
    beta, delta = 0.5, 0.2
    got, _ = L.bco_pair(**p, beta=beta, delta=delta)
    zw, zl = np.array([0.3, -1.0]), np.array([0.0, 0.5])
    softplus = lambda u: np.log1p(np.exp(u))  # noqa: E731
    np.testing.assert_allclose(got, softplus(-(beta * zw - delta)) + softplus(beta * zl - delta), rtol=1e-12)
    got, _ = L.dpo(**p, beta=beta, label_smoothing=0.1)
    x = beta * (zw - zl)
    np.testing.assert_allclose(got, 0.9 * softplus(-x) + 0.1 * softplus(x), rtol=1e-12)


@pytest.mark.usefixtures("x64")
def test_sft_padding_rows_keep_the_token_mean_under_jit():
    """A trainer batch padded with empty rows (length 0, weight 0) still gets TRL's value."""
    pol_w = jnp.asarray([-6.0, -20.0, 0.0, 0.0])
    lens_w = jnp.asarray([3, 10, 0, 0])  # rows 2, 3 are padding
    fn = jax.jit(lambda p, lw: L.sft(policy_chosen_logps=p, policy_rejected_logps=p, beta=0.1, chosen_lengths=lw)[0])
    got = fn(pol_w, lens_w)
    weights = np.asarray([1.0, 1.0, 0.0, 0.0])
    assert float(np.sum(weights * np.asarray(got)) / weights.sum()) == pytest.approx(26.0 / 13.0, rel=1e-15)
    np.testing.assert_array_equal(np.asarray(got)[2:], 0.0)
