"""Splash attention (the Pallas TPU kernel, in interpret mode on this CPU) against the
written-out attention: forward and gradients for the causal, padded, packed, sliding and
soft-capped cases, alone, inside a model, and under a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mio_jax import sharding, testing, train_step
from mio_jax.data import batching
from mio_jax.models import init_model, llama
from mio_jax.models.splash import block_size, splash_attention
from tiny_checkpoints import policy_logps, random_groups

B, T, H, KV, HD = 2, 128, 4, 2, 32


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
                 for s in ((B, T, H, HD), (B, T, KV, HD), (B, T, KV, HD)))


def _dense_mask(segments, window=None):
    """The written-out attention's mask of the same rule: causal, same segment, window."""
    i = jnp.arange(T)
    mask = (i[None, :, None] >= i[None, None, :]) & (segments[:, :, None] == segments[:, None, :])
    if window is not None:
        mask &= (i[None, :, None] - i[None, None, :]) < window
    return mask


SEGMENTS = {
    "padded": jnp.asarray([[1] * T, [1] * 100 + [0] * 28]),
    "packed": jnp.asarray([[1] * 40 + [2] * 50 + [3] * 30 + [0] * 8, [1] * 77 + [2] * 51]),
}


@pytest.mark.parametrize("layout", sorted(SEGMENTS))
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 5.0)])
def test_forward_and_gradients_equal_the_written_out_attention(layout, window, softcap):
    q, k, v = _qkv()
    seg = SEGMENTS[layout]
    real = (seg != 0)[:, :, None, None]  # rows nobody reads (padding) are not compared
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, HD)), jnp.float32) * real

    def ours(q, k, v):
        return splash_attention(q, k, v, seg, scale=0.2, window=window, softcap=softcap)

    def ref(q, k, v):
        return llama.xla_attention(q, k, v, _dense_mask(seg, window), scale=0.2,
                                   softcap=softcap)

    np.testing.assert_allclose(ours(q, k, v) * real, ref(q, k, v) * real, atol=2e-5)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_a_traced_layer_flag_picks_the_sliding_or_the_global_kernel():
    q, k, v = _qkv(2)
    seg = SEGMENTS["padded"]
    real = (seg != 0)[:, :, None, None]
    f = jax.jit(lambda flag: splash_attention(q, k, v, seg, scale=0.2, window=16,
                                              sliding=flag))
    for flag, window in ((True, 16), (False, None)):
        want = llama.xla_attention(q, k, v, _dense_mask(seg, window), scale=0.2)
        np.testing.assert_allclose(f(jnp.asarray(flag)) * real, want * real, atol=2e-5)


def test_lengths_the_kernel_cannot_tile_are_refused():
    assert block_size(32768) == 512 and block_size(384) == 128
    with pytest.raises(ValueError, match="divisible by 128.*pad_to_multiple_of"):
        block_size(200)


def test_a_gemma_model_gives_the_same_logps_and_step_with_splash():
    """The tiny Gemma 3 (a sliding layer of window 4, a global one, soft-caps): the
    unshared and packed layouts give the written-out attention's log-probs with splash
    (and their gradients, packed), on one device and under a (data, fsdp, tensor) mesh
    (the kernel inside shard_map)."""
    xla = testing.tiny_gemma_config()
    groups = random_groups(4, 2, seed=3, lengths=(5, 30))
    unshared = batching.collate(groups, np.arange(4), K=2, L=128)
    packed = batching.pack(groups, np.arange(4), K=2, R=4, L=128)
    cfg = train_step.StepConfig(loss_name="mio", beta=0.1, chunk_size=48, reference="frozen")
    model = init_model(xla, seed=0)
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    splash_model = init_model(dataclasses.replace(xla, attention="splash"), seed=0)
    graphdef_s = nnx.graphdef(splash_model)
    for batch in (unshared, packed):
        want = np.asarray(policy_logps(graphdef, params, other, batch, cfg))
        got = np.asarray(policy_logps(graphdef_s, params, other, batch, cfg))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)
    grad = jax.jit(jax.grad(lambda p, g: jnp.sum(train_step.policy_logps(
        g, p, other, packed, cfg).logps)), static_argnums=1)
    for a, b in zip(jax.tree.leaves(grad(params, graphdef_s)),
                    jax.tree.leaves(grad(params, graphdef))):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
    mesh = sharding.make_mesh((2, 2, 2))
    with jax.set_mesh(mesh):
        got = np.asarray(policy_logps(graphdef_s, params, other, unshared, cfg))
    np.testing.assert_allclose(got, np.asarray(policy_logps(graphdef, params, other, unshared, cfg)),
                               rtol=2e-6, atol=2e-5)
