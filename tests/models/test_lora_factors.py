"""mio_jax.models.lora: target resolution (PEFT names, regexes, layers), init, the low-rank
update and its hand-written backward, the float32 merge."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mio_jax.models import lora


def test_targets_by_names_all_linear_regex_and_layers():
    all7 = lora.resolve_targets("all-linear", 3)
    assert [r for r, _ in all7] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert all(layers == (0, 1, 2) for _, layers in all7)
    assert lora.resolve_targets(["v_proj", "q_proj"], 2) == (("q", (0, 1)), ("v", (0, 1)))
    assert lora.resolve_targets("q_proj, down_proj", 2) == (("q", (0, 1)), ("down", (0, 1)))
    picked = lora.resolve_targets(r"model\.layers\.(0|2)\.mlp\.(up|down)_proj", 3)
    assert picked == (("up", (0, 2)), ("down", (0, 2)))
    assert lora.resolve_targets("all-linear", 4, [1, 3])[0] == ("q", (1, 3))


@pytest.mark.parametrize("targets,match", [
    ("qkv_proj", "unknown module name"), (r".*\.nothing", "matches no linear module"),
    ("([", "neither module names nor a valid regex")])
def test_bad_targets_name_the_key(targets, match):
    with pytest.raises(ValueError, match=match) as e:
        lora.resolve_targets(targets, 2)
    assert "model.lora.target_modules" in str(e.value)


def test_spec_scale_and_checks():
    spec = lora.make_spec(rank=16, alpha=32, target_modules="all-linear", num_layers=2)
    assert spec.scale == 2.0
    rs = lora.make_spec(rank=16, alpha=32, target_modules="all-linear", num_layers=2,
                        use_rslora=True)
    assert rs.scale == pytest.approx(8.0)
    part = lora.make_spec(rank=2, alpha=2, target_modules="q_proj", num_layers=3,
                          layers_to_transform=[1])
    assert part.partial("q") and np.asarray(part.layer_mask("q")).tolist() == [0, 1, 0]
    for bad, key in ((dict(rank=0), "rank=0"), (dict(alpha=0), "alpha=0"),
                     (dict(dropout=1.0), "dropout=1.0"), (dict(init="pissa"), "init='pissa'")):
        kw = {**dict(rank=4, alpha=8, target_modules="all-linear", num_layers=2), **bad}
        with pytest.raises(ValueError, match=f"model.lora.{key}"):
            lora.make_spec(**kw)


@pytest.mark.parametrize("init", lora.INITS)
def test_init_has_b_exactly_zero_and_peft_scales_of_a(init):
    spec = lora.make_spec(rank=8, alpha=16, target_modules="all-linear", num_layers=2, init=init)
    a, b = lora.init_factors(jax.random.PRNGKey(0), (2, 512, 8), (2, 8, 64), spec, jnp.float32)
    assert float(jnp.abs(b).max()) == 0.0
    if init == "default":  # Kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert float(jnp.abs(a).max()) <= 1 / math.sqrt(512)
        assert float(jnp.std(a)) == pytest.approx(1 / math.sqrt(3 * 512), rel=0.05)
    else:
        assert float(jnp.std(a)) == pytest.approx(1 / 8, rel=0.05)


def _plain(x, a, b, scale, n_in):
    low = jnp.tensordot(x, a, axes=n_in)
    return scale * jnp.tensordot(low, b, axes=1)


@pytest.mark.parametrize("n_in", [1, 2])
def test_low_rank_update_and_its_backward_equal_autodiff(n_in):
    rng = np.random.default_rng(0)
    in_dims, out_dims = ((12,), (3, 4)) if n_in == 1 else ((3, 4), (12,))
    x = jnp.asarray(rng.standard_normal((2, 5, *in_dims)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((*in_dims, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, *out_dims)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 5, *out_dims)), jnp.float32)

    def ours(x, a, b):
        return jnp.sum(w * lora.delta(x, a, b, 0.7, n_in=n_in))

    def ref(x, a, b):
        return jnp.sum(w * _plain(x, a, b, 0.7, n_in))

    np.testing.assert_allclose(ours(x, a, b), ref(x, a, b), rtol=1e-5)
    for g1, g2 in zip(jax.jit(jax.grad(ours, (0, 1, 2)))(x, a, b), jax.grad(ref, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-5)


def test_dropout_scales_kept_inputs_and_is_off_without_a_key():
    x = jnp.ones((1, 4000, 8), jnp.float32)
    a = jnp.eye(8, 2, dtype=jnp.float32)
    b = jnp.ones((2, 1), jnp.float32)
    off = lora.delta(x, a, b, 1.0, n_in=1, dropout=0.5)
    assert float(jnp.abs(off - 2.0).max()) == 0.0
    on = lora.delta(x, a, b, 1.0, n_in=1, dropout=0.5, key=jax.random.PRNGKey(1))
    values = set(np.unique(np.asarray(on)).tolist())
    assert values <= {0.0, 2.0, 4.0} and float(on.mean()) == pytest.approx(2.0, rel=0.05)


def test_merged_weight_is_the_float32_update_with_the_layer_mask():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((3, 6, 2, 5)), jnp.bfloat16)
    a = jnp.asarray(rng.standard_normal((3, 6, 4)) * 1e-3, jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 4, 2, 5)) * 1e-3, jnp.float32)
    mask = jnp.asarray([1.0, 0.0, 1.0])
    got = lora.merged_weight(w, a, b, 2.0, mask)
    assert got.dtype == jnp.bfloat16
    want = np.asarray(w, np.float32) + 2.0 * np.asarray(mask)[:, None, None, None] * \
        np.einsum("lir,lrhk->lihk", np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want, jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(w[1]))  # masked layer as is
