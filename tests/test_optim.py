"""Schedules and AdamW + clipping against closed forms."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mio_jax import optim


def test_warmup_then_cosine_closed_form():
    lr = optim.make_schedule(learning_rate=1.0, total_steps=110, warmup_steps=10,
                             schedule="cosine", final_lr_fraction=0.1)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    # halfway through the decay: alpha + (1 - alpha) * (1 + cos(pi/2)) / 2
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)
    assert float(lr(110)) == pytest.approx(0.1, rel=1e-6)
    t = 35
    want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))
    assert float(lr(t)) == pytest.approx(want, rel=1e-6)


def test_linear_and_constant():
    lin = optim.make_schedule(learning_rate=2.0, total_steps=20, warmup_steps=0,
                              schedule="linear")
    assert [float(lin(s)) for s in (0, 10, 20)] == pytest.approx([2.0, 1.0, 0.0])
    const = optim.make_schedule(learning_rate=3.0, total_steps=20, warmup_steps=4,
                                schedule="constant")
    assert [float(const(s)) for s in (2, 4, 19)] == pytest.approx([1.5, 3.0, 3.0])
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.make_schedule(learning_rate=1.0, total_steps=2, schedule="step")


def _adam_numpy(grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, p0=None, clip=None):
    p = np.array(p0, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        if clip is not None:
            n = np.linalg.norm(g)
            g = g * min(1.0, clip / n)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * (mh / (np.sqrt(vh) + eps) + wd * p)
    return p


@pytest.mark.parametrize("clip", [None, 1.0])
def test_adamw_with_clipping_matches_closed_form(clip):
    p0 = np.array([0.5, -1.0, 2.0], np.float32)
    grads = [np.array([6.0, -8.0, 0.0], np.float32), np.array([0.01, 0.02, -0.03], np.float32)]
    tx, _ = optim.make_optimizer(learning_rate=0.1, total_steps=10, warmup_steps=0,
                                 schedule="constant", weight_decay=0.01,
                                 max_grad_norm=clip if clip else 0.0)
    params = jnp.asarray(p0)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = params + updates
    want = _adam_numpy(grads, 0.1, wd=0.01, p0=p0, clip=clip)
    np.testing.assert_allclose(np.asarray(params), want, rtol=1e-5, atol=1e-6)
    # clipping changes the result here (the first gradient has norm 10)
    other = _adam_numpy(grads, 0.1, wd=0.01, p0=p0, clip=None if clip else 1.0)
    assert np.abs(want - other).max() > 1e-3
