"""Finite losses and gradients at extreme inputs, for every registered loss and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mio_jax.losses as L

# |beta * z| up to 1e4 (beta = 1), log-probs down to -1e5, ties and near-zero log-probs.
Z_W = np.array([-1e4, 1e4, 0.0, -1e4, 1e4, 3.0, -5e3, 0.0])
Z_L = np.array([1e4, -1e4, 0.0, -1e4, 1e4, -3.0, 5e3, 1e4])
REF_W = np.array([-9e4, -1.1e5 + 1e4, -1e-3, -9e4, -1e5 + 1e4 - 1, -20.0, -9.5e4, -1e5])
REF_L = np.array([-1e5 + 0.0, -9e4, -1e-3, -9e4, -1e5 + 1e4 - 1, -20.0, -1e5 + 5e3 - 10, -1e5])
LEN_W = np.array([1, 2048, 1, 7, 1, 3, 512, 1])
LEN_L = np.array([4096, 1, 1, 7, 1, 9, 1, 2])
HPARAMS = {"exo_pair": {"label_smoothing": 1e-3}}


def _inputs(dtype):
    pol_w, pol_l = REF_W + Z_W, REF_L + Z_L  # policy log-probs reach -1e5 (and exactly 0 in row 2)
    cast = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)  # noqa: E731
    return cast(pol_w), cast(pol_l), cast(REF_W), cast(REF_L)


def _check_finite(name, dtype, beta=1.0, **hp):
    pw, pl, rw, rl = _inputs(dtype)

    def batch_loss(pw, pl, rw, rl):
        losses, metrics = L.compute(
            name, policy_chosen_logps=pw, policy_rejected_logps=pl, ref_chosen_logps=rw, ref_rejected_logps=rl,
            beta=beta, chosen_lengths=jnp.asarray(LEN_W), rejected_lengths=jnp.asarray(LEN_L), **hp,
        )  # fmt: skip
        return jnp.mean(losses), (losses, metrics)

    (_, (losses, metrics)), grads = jax.value_and_grad(batch_loss, argnums=(0, 1), has_aux=True)(pw, pl, rw, rl)
    assert losses.dtype == jnp.float32, f"{name}: {dtype} inputs must give float32 losses"
    assert np.all(np.isfinite(np.asarray(losses))), f"{name} {dtype}: losses {losses}"
    for g in grads:
        assert g.dtype == dtype
        assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name} {dtype}: grads {g}"
    for key, v in metrics.items():
        assert np.all(np.isfinite(np.asarray(v))), f"{name} {dtype}: metric {key} = {v}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", L.names())
def test_every_loss_finite_at_extremes(name, dtype):
    _check_finite(name, dtype, **HPARAMS.get(name, {}))


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "exo_pair", "discopop"])
def test_f_divergences_finite_at_extremes(name, fdiv):
    _check_finite(name, jnp.float32, beta=0.5, f_divergence_type=fdiv, **HPARAMS.get(name, {}))


@pytest.mark.parametrize("name", ["infonce", "js_multi", "nwj"])
def test_multi_negative_finite_at_extremes(name):
    t = jnp.asarray([[1e4, -1e4, 0.0, 1e4], [-1e4, 1e4, 1e4, -1e4]], jnp.bfloat16)
    ref = jnp.full((2, 4), -9e4, jnp.bfloat16)
    valid = jnp.asarray([[True, True, False, True], [True, True, True, True]])
    grad = jax.grad(lambda p: jnp.sum(L.compute_group(name, policy_logps=p, ref_logps=ref, beta=1.0, valid=valid)[0]))(ref + t)
    losses, _ = L.compute_group(name, policy_logps=ref + t, ref_logps=ref, beta=1.0, valid=valid)
    assert np.all(np.isfinite(np.asarray(losses))) and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_float64_stays_float64(x64):
    pw, pl, rw, rl = (jnp.asarray(a, jnp.float64) for a in (REF_W + Z_W, REF_L + Z_L, REF_W, REF_L))
    losses, metrics = L.mio(policy_chosen_logps=pw, policy_rejected_logps=pl, ref_chosen_logps=rw, ref_rejected_logps=rl, beta=1.0)
    assert losses.dtype == jnp.float64 and metrics["mi/js"].dtype == jnp.float64
    # Saturated values are exact, not merely finite: sp(-1e4) + sp(1e4)/2 + sp(-1e4)/2 = 5e3 (row 1).
    assert float(losses[1]) == pytest.approx(5e3, rel=1e-12)
    assert float(losses[0]) == pytest.approx(1e4 + 5e3, rel=1e-12)
