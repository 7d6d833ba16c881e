"""Speed options of the train step keep its results: the completion-only output
projection (``StepConfig.max_tokens_fraction``) equals the full projection, an
undersized bound gives NaN (never silently dropped tokens), bad settings raise."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from mio_jax import models, testing, train_step
from mio_jax.data import batching, shared_prompt
from mio_jax.data.tokenize import TokenizedGroup

VOCAB = testing.VOCAB


def _batch(n=6, L=24, seed=0):
    rng = np.random.default_rng(seed)
    def ids(lo, hi):
        return rng.integers(5, VOCAB, int(rng.integers(lo, hi))).astype(np.int32)

    groups = [TokenizedGroup(row_id=str(i), prompt_ids=ids(6, 12),
                             completion_ids=(ids(2, 8), ids(2, 8))) for i in range(n)]
    return batching.collate(groups, np.arange(n), K=2, L=L)


@pytest.fixture(scope="module")
def setup():
    model = models.init_model(testing.tiny_model_config(), seed=0)
    graphdef, p, o = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(p), nnx.to_pure_dict(o)


def _step(setup, batch, **kw):
    graphdef, params, other = setup
    cfg = train_step.StepConfig(loss_name="mio", beta=0.1, chunk_size=40, lengths=False, **kw)
    tx = optax.sgd(1.0)
    fn = jax.jit(functools.partial(train_step.train_step, graphdef=graphdef, tx=tx,
                                   schedule=lambda s: 1.0, cfg=cfg))
    ref = jax.tree.map(lambda x: x * 1.01, params)
    state, m = fn(train_step.init_state(params, tx), batch, train_step.StepConsts(other, ref))
    return jax.device_get(state.params), {k: float(v) for k, v in m.items()}


def test_completion_only_projection_equals_full_projection(setup):
    batch = _batch()
    frac = (batch.loss_mask != 0).mean()
    p_full, m_full = _step(setup, batch)
    p_mt, m_mt = _step(setup, batch, max_tokens_fraction=float(frac) + 0.01)
    assert abs(m_full["loss"] - np.log(4.0)) > 1e-4  # reference != policy: a real value
    for key in ("loss", "grad_norm", "rewards/margins"):
        np.testing.assert_allclose(m_mt[key], m_full[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_mt)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_too_small_bound_gives_nan_not_dropped_tokens(setup):
    batch = _batch()
    frac = (batch.loss_mask != 0).mean()
    _, m = _step(setup, batch, max_tokens_fraction=float(frac) / 2)
    assert np.isnan(m["loss"])


def test_bad_settings_raise(setup):
    with pytest.raises(ValueError, match="max_tokens_fraction"):
        _step(setup, _batch(), max_tokens_fraction=1.5)
    shared = shared_prompt.to_shared_prompt(_batch())
    with pytest.raises(ValueError, match="unshared"):
        _step(setup, shared, ld_alpha=0.5)
