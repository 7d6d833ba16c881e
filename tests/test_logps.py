"""Tests for mio_jax.logps: chunked log-probs against a float64 numpy reference,
gradients against naive autodiff, WPO / LD-DPO against TRL 1.16 golden numbers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mio_jax import logps as L

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_trl_logps.json")


# ---------------------------------------------------------------- helpers


def _log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference_token_logps(logits, targets, mask):
    """float64 numpy: full log-softmax, gather, mask."""
    lsm = _log_softmax64(logits)
    safe = np.where(mask != 0, targets, 0)
    picked = np.take_along_axis(lsm, safe[..., None], -1)[..., 0]
    return np.where(mask != 0, picked, 0.0)


def _inputs(rng, lead, t, v, d=8):
    """Random logits/hidden/targets and masks of varying lengths.

    Row 0 (flattened) has a single completion token; prompts are padded with
    the invalid id -100 where the mask is 0, as TRL's labels are.
    """
    n = int(np.prod(lead))
    mask = np.zeros((n, t), np.int32)
    for i in range(n):
        length = 1 if i == 0 else int(rng.integers(2, t))
        start = int(rng.integers(0, t - length + 1))
        mask[i, start:start + length] = 1
    targets = rng.integers(0, v, (n, t))
    targets = np.where(mask != 0, targets, -100)
    hidden = rng.normal(size=(n, t, d)).astype(np.float32)
    out = (rng.normal(size=(v, d)) * 1.5).astype(np.float32)
    logits = (rng.normal(size=(n, t, v)) * 3).astype(np.float32)
    shape = tuple(lead) + (t,)
    return (logits.reshape(shape + (v,)), hidden.reshape(shape + (d,)), out,
            targets.reshape(shape), mask.reshape(shape))


def _naive_sequence_logps(logits, targets, mask):
    """Naive JAX version (full log-softmax), used as the gradient reference."""
    lsm = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.where(mask != 0, targets, 0)
    picked = jnp.take_along_axis(lsm, safe[..., None], -1)[..., 0]
    return jnp.where(mask != 0, picked, 0.0).sum(-1)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("lead,dtype,chunk_size", [  # 37 % 7 != 0; 64 > V (one chunk)
    ((3,), jnp.float32, 7), ((2, 2), jnp.bfloat16, 7), ((3,), jnp.bfloat16, 64),
    ((2, 2), jnp.float32, 37),
])
def test_sequence_logps_matches_float64_reference(lead, dtype, chunk_size):
    rng = np.random.default_rng(0)
    logits, _, _, targets, mask = _inputs(rng, lead, t=6, v=37)
    logits = jnp.asarray(logits, dtype)
    # The reference sees exactly the values the function sees (bf16-rounded).
    expected_tok = _reference_token_logps(np.asarray(logits.astype(jnp.float32)), targets, mask)

    tok = L.token_logps(logits, targets, mask, chunk_size=chunk_size)
    seq = L.sequence_logps(logits, targets, mask, chunk_size=chunk_size)

    assert tok.shape == tuple(lead) + (6,) and tok.dtype == jnp.float32
    assert seq.shape == tuple(lead) and seq.dtype == jnp.float32
    np.testing.assert_allclose(tok, expected_tok, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(seq, expected_tok.sum(-1), rtol=2e-6, atol=5e-6)
    assert np.all(np.asarray(tok)[mask == 0] == 0.0)
    jitted = jax.jit(lambda x: L.sequence_logps(x, targets, mask, chunk_size=chunk_size))(logits)
    np.testing.assert_allclose(jitted, seq, rtol=1e-6)


@pytest.mark.parametrize("lead,dtype,max_tokens", [
    ((3,), jnp.float32, None), ((2, 2), jnp.bfloat16, None), ((2, 2), jnp.float32, 30),
    ((3,), jnp.bfloat16, 30),
])
def test_sequence_logps_from_hidden_matches_float64_reference(lead, dtype, max_tokens):
    rng = np.random.default_rng(1)
    _, hidden, out, targets, mask = _inputs(rng, lead, t=8, v=53)
    hidden, out = jnp.asarray(hidden, dtype), jnp.asarray(out, dtype)
    logits64 = np.asarray(hidden, np.float64) @ np.asarray(out, np.float64).T
    expected_tok = _reference_token_logps(logits64, targets, mask)

    stats = L.token_stats_from_hidden(hidden, out, targets, mask, chunk_size=16,
                                      max_tokens=max_tokens, with_log_sum_sq=True)
    seq = L.sequence_logps_from_hidden(hidden, out, targets, mask, chunk_size=16,
                                       max_tokens=max_tokens)

    expected_lss = np.log((np.exp(_log_softmax64(logits64)) ** 2).sum(-1))
    np.testing.assert_allclose(stats.logps_bt, expected_tok, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.log_sum_sq_probs_bt, np.where(mask != 0, expected_lss, 0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seq, expected_tok.sum(-1), rtol=1e-5, atol=1e-5)
    assert seq.shape == tuple(lead) and seq.dtype == jnp.float32


def test_from_hidden_agrees_with_from_logits_and_under_jit_and_sharding():
    rng = np.random.default_rng(2)
    _, hidden, out, targets, mask = _inputs(rng, (8,), t=5, v=29)
    logits = jnp.asarray(hidden) @ jnp.asarray(out).T
    from_logits = L.sequence_logps(logits, targets, mask, chunk_size=8)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    args = [jax.device_put(x, shard) for x in (hidden, targets, mask)]
    fn = jax.jit(lambda h, w, t, m: L.sequence_logps_from_hidden(h, w, t, m, chunk_size=8))
    sharded = fn(args[0], jnp.asarray(out), args[1], args[2])
    unsharded = fn(jnp.asarray(hidden), jnp.asarray(out), targets, mask)
    np.testing.assert_allclose(unsharded, from_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded, unsharded, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- gradients


def test_logits_gradient_matches_naive_float64(x64):
    rng = np.random.default_rng(3)
    logits, _, _, targets, mask = _inputs(rng, (2, 2), t=6, v=37)
    logits = jnp.asarray(logits, jnp.float64)
    cot = jnp.asarray(rng.normal(size=(2, 2)))  # a generic cotangent per sequence

    def loss(fn):
        return lambda x: (fn(x, targets, mask) * cot).sum()

    chunked = jax.jit(jax.grad(loss(lambda *a: L.sequence_logps(*a, chunk_size=7))))(logits)
    naive = jax.jit(jax.grad(loss(_naive_sequence_logps)))(logits)
    assert chunked.dtype == jnp.float64
    np.testing.assert_allclose(chunked, naive, rtol=1e-12, atol=1e-12)
    assert np.abs(np.asarray(naive)).max() > 0.1  # the check is not vacuous


@pytest.mark.parametrize("max_tokens", [None, 20])
def test_hidden_gradients_match_naive_float64(x64, max_tokens):
    rng = np.random.default_rng(4)
    _, hidden, out, targets, mask = _inputs(rng, (3, 2), t=5, v=41)
    hidden, out = jnp.asarray(hidden, jnp.float64), jnp.asarray(out, jnp.float64)
    cot = jnp.asarray(rng.normal(size=(3, 2)))

    def chunked(h, w):
        seq = L.sequence_logps_from_hidden(h, w, targets, mask, chunk_size=8, max_tokens=max_tokens)
        return (seq * cot).sum()

    def naive(h, w):
        return (_naive_sequence_logps(h @ w.T, targets, mask) * cot).sum()

    got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, out)
    want = jax.jit(jax.grad(naive, argnums=(0, 1)))(hidden, out)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float64
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(jax.jit(chunked)(hidden, out), naive(hidden, out), rtol=1e-12)


def test_bfloat16_gradients_keep_dtype_and_match_float64():
    rng = np.random.default_rng(5)
    logits, _, _, targets, mask = _inputs(rng, (3,), t=6, v=37)
    logits = jnp.asarray(logits, jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda x: L.sequence_logps(x, targets, mask, chunk_size=7).sum()))(logits)
    assert grad.dtype == jnp.bfloat16
    # d/dz sum_t log p(target_t) = onehot - softmax on masked positions, float64
    probs = np.exp(_log_softmax64(np.asarray(logits.astype(jnp.float32))))
    onehot = np.eye(37)[np.where(mask != 0, targets, 0)]
    expected = (onehot - probs) * (mask != 0)[..., None]
    np.testing.assert_allclose(np.asarray(grad, np.float32), expected, atol=8e-3)


def test_from_hidden_never_materialises_logits():
    """Compiled temp memory of value_and_grad stays far below one f32 [N, V]."""
    n, d, v, chunk = 128, 16, 16384, 512
    hidden = jax.ShapeDtypeStruct((n // 8, 8, d), jnp.float32)
    out = jax.ShapeDtypeStruct((v, d), jnp.float32)
    targets = jax.ShapeDtypeStruct((n // 8, 8), jnp.int32)

    def loss(h, w, t):
        return L.sequence_logps_from_hidden(h, w, t, jnp.ones(t.shape, jnp.int32),
                                            chunk_size=chunk, validate=False).sum()

    stats = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, out, targets)
    temp = stats.compile().memory_analysis().temp_size_in_bytes
    full_logits = n * v * 4
    # One [N, V] f32 is 8 MiB; the naive version's temp is ~40 MiB, the chunked ~0.3 MiB.
    assert temp < full_logits / 4, (temp, full_logits)


# ---------------------------------------------------------------- bad input


def test_zero_completion_rows_raise_with_row_indices():
    rng = np.random.default_rng(6)
    logits, hidden, out, targets, mask = _inputs(rng, (3, 2), t=5, v=11)
    mask = mask.copy()
    mask[1, 0] = 0
    mask[2, 1] = 0
    with pytest.raises(ValueError, match=r"2 of 6 rows have no completion token.*\[\(1, 0\), \(2, 1\)\]"):
        L.check_completion_tokens(mask)
    with pytest.raises(ValueError, match="no completion token"):
        L.sequence_logps(logits, targets, mask)
    with pytest.raises(ValueError, match="no completion token"):
        L.sequence_logps_from_hidden(hidden, out, targets, mask)
    with pytest.raises(ValueError, match="no completion token"):
        L.token_stats(logits, targets, mask, with_log_sum_sq=True)
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(L.check_completion_tokens)(mask)
    # A concrete mask closed over by a jitted function is still checked at trace time.
    with pytest.raises(ValueError, match="no completion token"):
        jax.jit(lambda x: L.sequence_logps(x, targets, mask))(logits)
    # A traced mask cannot be checked; the row silently gives 0 (hence the eager API).
    traced = jax.jit(lambda x, m: L.sequence_logps(x, targets, m))(logits, mask)
    assert traced[1, 0] == 0.0 and traced[2, 1] == 0.0


def test_bad_targets_and_shapes_raise():
    rng = np.random.default_rng(7)
    logits, hidden, out, targets, mask = _inputs(rng, (2,), t=5, v=11)
    bad = np.where(mask != 0, 11, targets)
    with pytest.raises(ValueError, match=r"outside \[0, 11\)"):
        L.sequence_logps(logits, bad, mask)
    with pytest.raises(ValueError, match="does not match targets_bt"):
        L.sequence_logps(logits[:, :4], targets, mask)
    with pytest.raises(ValueError, match=r"out_vd must be \[V, D=8\]"):
        L.sequence_logps_from_hidden(hidden, out.T, targets, mask)
    with pytest.raises(TypeError, match="integer token ids"):
        L.sequence_logps(logits, targets.astype(np.float32), mask)


def test_max_tokens_overflow_raises_eagerly_and_is_nan_under_jit():
    rng = np.random.default_rng(8)
    _, hidden, out, targets, mask = _inputs(rng, (3,), t=6, v=13)
    count = int(mask.sum())
    with pytest.raises(ValueError, match=f"{count} completion tokens but max_tokens={count - 1}"):
        L.sequence_logps_from_hidden(hidden, out, targets, mask, max_tokens=count - 1)
    jitted = jax.jit(lambda m: L.sequence_logps_from_hidden(hidden, out, targets, m,
                                                            max_tokens=count - 1))(mask)
    assert np.all(np.isnan(jitted))
    exact, full = jax.jit(lambda h: (
        L.sequence_logps_from_hidden(h, out, targets, mask, max_tokens=count),
        L.sequence_logps_from_hidden(h, out, targets, mask)))(hidden)
    np.testing.assert_allclose(exact, full, rtol=1e-6)


# ---------------------------------------------------------------- WPO and LD-DPO


def test_wpo_weight_is_one_for_uniform_distribution():
    # p_v = 1/V for every v, so log p_target = log sum_v p_v^2 = -log V: weight exp(0) = 1.
    targets = np.array([[[1, 2, 3], [4, 0, 0]]])
    mask = np.array([[[0, 1, 1], [1, 1, 0]]])
    stats = L.token_stats(jnp.zeros((1, 2, 3, 9)), targets, mask, chunk_size=4, with_log_sum_sq=True)
    np.testing.assert_allclose(stats.log_sum_sq_probs_bt, -np.log(9) * mask, rtol=1e-6)
    np.testing.assert_allclose(L.wpo_weights(stats.logps_bt, stats.log_sum_sq_probs_bt, mask),
                               [1.0], rtol=1e-6)


def test_ld_sequence_logps_closed_form():
    lp = jnp.array([[[0.0, -1.0, -2.0, -3.0, 0.0], [-10.0, -20.0, 0.0, 0.0, 0.0]]])
    mask = jnp.array([[[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]]])
    # shared length 2: chosen keeps -1 - 2 and scales -3; rejected has no tail.
    np.testing.assert_allclose(L.ld_sequence_logps(lp, mask, 0.25), [[-3.75, -30.0]])
    np.testing.assert_allclose(L.ld_sequence_logps(lp, mask, 1.0), lp.sum(-1))


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN, encoding="utf-8") as f:
        g = json.load(f)
    n = len(g["targets_nt"])
    # TRL's rows [chosen..., rejected...] -> our [B, K=2, ...] layout.
    pair = lambda x: np.stack(np.split(np.asarray(x), 2), axis=1)  # noqa: E731
    arrays = {k: pair(g[k]) for k in ("hidden_ntd", "targets_nt", "mask_nt", "token_logps_nt",
                                       "token_log_sum_sq_probs_nt")}
    arrays["out_vd"] = np.asarray(g["out_vd"])
    assert arrays["targets_nt"].shape[:2] == (n // 2, 2)
    return g, arrays


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_against_trl_golden(golden, precision, request):
    g, a = golden
    if precision == "float64":
        request.getfixturevalue("x64")
    dt = jnp.float64 if precision == "float64" else jnp.float32
    # TRL computed in float32, so its numbers carry float32 rounding (measured:
    # <7e-7 absolute per token, <1e-7 relative per sequence, 3.5e-7 on WPO weights).
    rtol = 1e-6 if precision == "float64" else 1e-4
    hidden, out = jnp.asarray(a["hidden_ntd"], dt), jnp.asarray(a["out_vd"], dt)
    targets, mask = a["targets_nt"], a["mask_nt"]

    stats = L.token_stats_from_hidden(hidden, out, targets, mask, chunk_size=16,
                                      with_log_sum_sq=True)
    np.testing.assert_allclose(stats.logps_bt, a["token_logps_nt"], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(stats.log_sum_sq_probs_bt, a["token_log_sum_sq_probs_nt"],
                               rtol=rtol, atol=rtol)
    logits_stats = L.token_stats(hidden @ out.T, targets, mask, chunk_size=16, with_log_sum_sq=True)
    np.testing.assert_allclose(logits_stats.logps_bt, a["token_logps_nt"], rtol=rtol, atol=rtol)

    seq = stats.logps_bt.sum(-1)
    np.testing.assert_allclose(seq[:, 0], g["sequence_logps_chosen"], rtol=rtol)
    np.testing.assert_allclose(seq[:, 1], g["sequence_logps_rejected"], rtol=rtol)

    ld = L.ld_sequence_logps(stats.logps_bt, mask, g["ld_alpha"])
    np.testing.assert_allclose(ld[:, 0], g["ld_logps_chosen"], rtol=rtol)
    np.testing.assert_allclose(ld[:, 1], g["ld_logps_rejected"], rtol=rtol)
    assert not np.allclose(ld, seq)  # the golden batch has a tail to scale

    for s in (stats, logits_stats):
        weights = L.wpo_weights(s.logps_bt, s.log_sum_sq_probs_bt, mask)
        np.testing.assert_allclose(weights, g["wpo_pair_weights"], rtol=rtol)


@pytest.mark.parametrize("scale", [0.1, 3.0])
@pytest.mark.parametrize("max_tokens", [None, 7])
def test_streamed_entropy_equals_the_full_softmax_entropy(scale, max_tokens):
    rng = np.random.default_rng(5)
    hidden = jnp.asarray(rng.normal(size=(2, 6, 8)) * scale, jnp.float32)
    out = jnp.asarray(rng.normal(size=(37, 8)), jnp.float32)  # 37: chunks of 16 and a tail
    targets = jnp.asarray(rng.integers(0, 37, (2, 6)))
    mask = jnp.asarray([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    stats = L.token_stats_from_hidden(hidden, out, targets, mask, chunk_size=16,
                                          max_tokens=max_tokens, with_entropy=True)
    logp = jax.nn.log_softmax(hidden @ out.T, axis=-1)
    want = jnp.where(mask > 0, -(jnp.exp(logp) * logp).sum(-1), 0.0)
    # lse - E[z]: float32 rounding of numbers of the logits' size
    np.testing.assert_allclose(stats.entropy_bt, want, atol=1e-5 * max(1.0, scale * 8))
    # no gradient flows through the entropy
    g = jax.grad(lambda h: L.token_stats_from_hidden(
        h, out, targets, mask, chunk_size=16, with_entropy=True).entropy_bt.sum())(hidden)
    assert float(jnp.abs(g).max()) == 0.0
