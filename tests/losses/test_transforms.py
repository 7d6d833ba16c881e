"""jax.jit, jax.grad and jax.vmap on every plain loss function give the eager values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mio_jax.losses as L

RNG = np.random.default_rng(7)
N, B = 3, 4  # vmap over N independent batches of B pairs
REF = jnp.asarray(RNG.uniform(-60, -20, (N, 2, B)), jnp.float32)
POL = REF + jnp.asarray(RNG.normal(0, 3, (N, 2, B)), jnp.float32)
LENS = jnp.asarray(RNG.integers(1, 30, (N, 2, B)), jnp.int32)
HPARAMS = {"exo_pair": {"label_smoothing": 0.01}, "dpo": {"label_smoothing": 0.1}, "robust": {"label_smoothing": 0.1}}


def _batch_loss(fn, pol_2b, ref_2b, lens_2b, beta):
    losses, metrics = fn(
        policy_chosen_logps=pol_2b[0], policy_rejected_logps=pol_2b[1],
        ref_chosen_logps=ref_2b[0], ref_rejected_logps=ref_2b[1],
        beta=beta, chosen_lengths=lens_2b[0], rejected_lengths=lens_2b[1],
    )  # fmt: skip
    return jnp.mean(losses), metrics["rewards/margins"]


@pytest.mark.parametrize("name", L.names())
def test_jit_vmap_grad(name):
    fn = functools.partial(getattr(L, name), **HPARAMS.get(name, {}))
    value_and_grad = jax.value_and_grad(_batch_loss, argnums=1, has_aux=True)
    # Eager reference, batch by batch.
    eager = [value_and_grad(fn, POL[i], REF[i], LENS[i], 0.3) for i in range(N)]
    # One compiled function: jit(vmap(grad)) with beta traced.
    fused = jax.jit(jax.vmap(functools.partial(value_and_grad, fn), in_axes=(0, 0, 0, None)))
    (loss_n, margins_n), grad_n = fused(POL, REF, LENS, jnp.float32(0.3))
    for i, ((loss, margins), grad) in enumerate(eager):
        np.testing.assert_allclose(loss_n[i], loss, rtol=2e-6, err_msg=f"{name} loss, batch {i}")
        np.testing.assert_allclose(grad_n[i], grad, rtol=2e-5, atol=1e-7, err_msg=f"{name} grad, batch {i}")
        np.testing.assert_allclose(margins_n[i], margins, rtol=1e-6)
    assert np.any(np.asarray(grad_n) != 0.0), f"{name}: gradient identically zero"


def test_string_hparams_are_static_via_partial():
    fn = jax.jit(functools.partial(L.sigmoid, f_divergence_type="js_divergence"))
    got, _ = fn(policy_chosen_logps=POL[0, 0], policy_rejected_logps=POL[0, 1], ref_chosen_logps=REF[0, 0], ref_rejected_logps=REF[0, 1], beta=0.1)
    want, _ = L.sigmoid(policy_chosen_logps=POL[0, 0], policy_rejected_logps=POL[0, 1], ref_chosen_logps=REF[0, 0], ref_rejected_logps=REF[0, 1], beta=0.1, f_divergence_type="js_divergence")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain, _ = L.sigmoid(policy_chosen_logps=POL[0, 0], policy_rejected_logps=POL[0, 1], ref_chosen_logps=REF[0, 0], ref_rejected_logps=REF[0, 1], beta=0.1)
    assert not np.allclose(got, plain)


def test_compute_group_under_jit_with_sharded_batch():
    """compute_group under jit on 8 devices (batch sharded) equals the unsharded result."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(3)
    pol = jnp.asarray(rng.normal(-40, 5, (16, 4)), jnp.float32)
    ref = jnp.asarray(rng.normal(-40, 5, (16, 4)), jnp.float32)
    valid = jnp.asarray(rng.random((16, 4)) > 0.3).at[:, 0].set(True)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    step = jax.jit(lambda p, r, v: L.compute_group("js_multi", policy_logps=p, ref_logps=r, beta=0.2, valid=v)[0])
    sharded = step(*(jax.device_put(x, sharding) for x in (pol, ref, valid)))
    np.testing.assert_allclose(sharded, step(pol, ref, valid), rtol=1e-6)
    # aot sorts across the (sharded) batch axis: still the global sort.
    lens = jnp.ones((16, 2), jnp.int32)
    aot = jax.jit(lambda p, r: L.compute_group("aot", policy_logps=p, ref_logps=r, beta=0.2, lengths=lens)[0])
    np.testing.assert_allclose(
        aot(jax.device_put(pol[:, :2], sharding), jax.device_put(ref[:, :2], sharding)), aot(pol[:, :2], ref[:, :2]), rtol=1e-6
    )
