"""Policy-gradient steps on rollout batches (train_step with ``policy_loss``) and the
rollout layout (mio_jax.rollouts): the step's loss is losses.policy_loss of the model's
per-token log-probs, padding and micro-batches change nothing, and the rollouts carry the
sampled tokens, rewards and advantages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerance
from mio_jax import layouts, losses, models, optim, rollouts, testing, train_step

VOCAB = testing.VOCAB
G = 4


def _samples(n, seed=0, g=G):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(5, VOCAB, int(rng.integers(2, 7))).tolist()
        samples = [{"ids": rng.integers(5, VOCAB, int(rng.integers(1, 9))).tolist(),
                    "reward": float(rng.integers(0, 2)), "finish": "eos"} for _ in range(g)]
        samples[0]["finish"] = "length"
        out.append({"prompt_ids": prompt, "samples": samples})
    return out


def _model(model_cfg=None):
    model = models.init_model(model_cfg or testing.tiny_model_config(), seed=0)
    graphdef, p, o = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(p), nnx.to_pure_dict(o)


def _batch(ro, ids, **tables):
    return rollouts.local_batch(ro, np.asarray(ids), pad_id=0, process_index=0,
                                process_count=1, **tables)


def _cfg(loss_type="grpo", **kw):
    hp = {"beta": 0.04, "epsilon": 0.2, **kw.pop("hp", {})}
    return train_step.StepConfig(loss_name="mio", beta=0.0, chunk_size=40, reference="none",
                                 policy_loss=loss_type, policy_hparams=tuple(sorted(hp.items())),
                                 **kw)


LR = 1e-2


def _step(cfg, batch, lr=LR, model_cfg=None):
    graphdef, params, other = _model(model_cfg)
    tx, sched = optim.make_optimizer(learning_rate=lr, total_steps=10, warmup_steps=0,
                                     schedule="constant", max_grad_norm=0.0)
    fn = jax.jit(functools.partial(train_step.train_step, graphdef=graphdef, tx=tx,
                                   schedule=sched, cfg=cfg))
    state, metrics = fn(train_step.init_state(params, tx), batch, train_step.StepConsts(other))
    return state, {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def ro():
    out, metrics = rollouts.build(_samples(6), scale_rewards="group",
                                  mask_truncated_completions=True, drop_zero_std_groups=False,
                                  min_length=16)
    return out


def _tables(ro, spread=0.3, seed=1, model_cfg=None):
    """Old-policy and reference tables near the model's own token log-probs (within
    +-`spread`, so some ratios fall outside 1 +- epsilon and are clipped), as in a round: a
    table far from the policy (the random tiny model's log-probs are near -30) makes
    exp(ref - logp) and exp(logp - old) of size e^30 whose products cancel, and leaves a
    gradient at rounding level that no float32 comparison can hold."""
    rng = np.random.default_rng(seed)
    graphdef, params, other = _model(model_cfg)
    batch = _batch(ro, np.arange(len(ro.groups)))
    logps = np.asarray(layouts.token_logps(nnx.merge(graphdef, params, other), batch,
                                           chunk_size=40).logps_bt)
    return {name: (logps + rng.uniform(-spread, spread, logps.shape)).astype(np.float32)
            for name in ("old_logps", "ref_logps")}


# grpo (per-completion means) and dapo (token sums over the step's count); the other
# reductions are the goldens' (tests/losses/test_policy_golden_trl.py)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_step_loss_is_policy_loss_of_the_models_token_logps(ro, loss_type):
    tables = _tables(ro)
    batch = _batch(ro, [0, 1, 2, 3], **tables)
    cfg = _cfg(loss_type)
    _, m = _step(cfg, batch)
    graphdef, params, other = _model()
    model = nnx.merge(graphdef, params, other)
    stats = layouts.token_logps(model, batch, chunk_size=40, with_entropy=True)
    tok = stats.logps_bt
    b, k, l = tok.shape
    mask = np.asarray(batch.loss_mask, np.float32)
    expected, em = losses.policy_loss(
        loss_type, tok.reshape(b * k, l), jnp.asarray(batch.old_token_logps).reshape(b * k, l),
        jnp.asarray(batch.advantages).reshape(-1), mask.reshape(b * k, l),
        ref_per_token_logps=jnp.asarray(batch.ref_token_logps).reshape(b * k, l),
        **dict(cfg.policy_hparams))
    # the same float32 program but for the reduction's order: float32 rounding of a sum
    # of ~100 terms of size ~1
    np.testing.assert_allclose(m["loss"], float(expected), rtol=1e-5, atol=1e-6)
    # kl is a mean of k3 terms of size ~1 in (ref - logp) ~ -3..3: the jitted step's and
    # this eager pass's float32 log-probs differ by ~3e-7, so compare to ~1e-6 absolute
    np.testing.assert_allclose(m["kl"], float(em["kl"]), rtol=1e-5, atol=2e-6)
    # entropy: -sum p log p of the full softmax at each counted position. The streamed
    # value is lse - E_p[z], a difference of numbers of the logits' size (~10), so its
    # float32 error is absolute (~1e-6 x 10), whatever the entropy's own size
    b_, k_, l_ = batch.input_ids.shape
    logits = model(jnp.asarray(batch.input_ids).reshape(b_ * k_, l_),
                   attention_mask=jnp.asarray(batch.attention_mask).reshape(b_ * k_, l_),
                   positions=jnp.asarray(batch.positions).reshape(b_ * k_, l_))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ent = -(jnp.exp(logp) * logp).sum(-1).reshape(b_, k_, l_)
    np.testing.assert_allclose(stats.entropy_bt, np.where(mask > 0, ent, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m["entropy"], float((ent * mask).sum() / mask.sum()), rtol=1e-5,
                               atol=1e-5)
    # the first slot of every group hit the token limit: masked, but counted as a row
    assert np.all(mask[:, 0] == 0) and np.all(mask[:, 1:].sum(-1) > 0)


@pytest.mark.rounding
def test_a_mixture_of_experts_logs_its_router_and_adds_its_losses_when_asked(ro):
    """A GRPO step on the tiny Qwen3-MoE: the router metrics ride on the step as on a
    preference step, and the load-balancing / z losses enter the loss with their weights."""
    moe = testing.tiny_moe_config()
    batch = _batch(ro, np.arange(len(ro.groups)), **_tables(ro, model_cfg=moe))
    _, off = _step(_cfg(), batch, model_cfg=moe)
    _, on = _step(_cfg(router_aux_loss_coef=0.5, router_z_loss_coef=0.1), batch, model_cfg=moe)
    assert off["router/assignments_per_token"] == 2.0
    assert on["router/load_balancing_loss"] == off["router/load_balancing_loss"] > 0
    np.testing.assert_allclose(on["loss"], off["loss"] + 0.5 * off["router/load_balancing_loss"]
                               + 0.1 * off["router/z_loss"], rtol=1e-5, atol=1e-7)


def test_padding_groups_and_micro_batches_change_nothing(ro):
    tables = _tables(ro)
    cfg = _cfg("grpo")
    a_state, a = _step(cfg, _batch(ro, [0, 1, 2, 3], **tables))
    # the same 4 groups with 4 padding groups, in two micro-batches
    b_state, b = _step(_cfg("grpo", grad_accum_steps=2),
                       _batch(ro, [0, -1, 1, -1, 2, -1, 3, -1], **tables))
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, atol=1e-7)
    _same_update(a, b, a_state, b_state)


def _same_update(a, b, a_state, b_state):
    """One Adam step from the same weights whose gradients differ only in rounding: the
    gradient norm within tests/tolerance.py's allowance for one update, and every weight
    within its allowance (a weight whose gradient is near Adam's eps may move differently)."""
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=tolerance.norm_rtol(1))
    tolerance.assert_params_close(a_state.params, b_state.params, learning_rate=LR, updates=1)


def test_on_policy_step_at_zero_advantage_and_beta_is_a_zero_gradient(ro):
    batch = _batch(ro, [0, 1, 2, 3])
    batch = batch.replace(advantages=np.zeros_like(batch.advantages))
    _, m = _step(_cfg("grpo", hp={"beta": 0.0}), batch)
    assert m["loss"] == 0.0 and m["grad_norm"] == 0.0


def test_rollouts_keep_the_sampled_tokens_and_group_advantages():
    samples = _samples(5, seed=3)
    samples[2]["samples"] = [dict(s, reward=1.0) for s in samples[2]["samples"]]  # no signal
    ro, m = rollouts.build(samples, scale_rewards="none", mask_truncated_completions=False,
                           drop_zero_std_groups=True, min_length=16)
    assert m["groups"] == 5 and m["groups_dropped"] >= 1 and len(ro.groups) == 5 - m["groups_dropped"]
    kept = [s for s in samples if np.std([x["reward"] for x in s["samples"]]) > 0]
    for grp, adv, s in zip(ro.groups, ro.advantages, kept):
        assert grp.prompt_ids.tolist() == s["prompt_ids"]
        assert [c.tolist() for c in grp.completion_ids] == [x["ids"] for x in s["samples"]]
        r = np.asarray([x["reward"] for x in s["samples"]])
        np.testing.assert_allclose(adv, r - r.mean(), rtol=1e-6)
    assert m["completions/clipped_ratio"] == 0.25  # one of 4 samples per prompt hit the limit
    lengths = [len(x["ids"]) for s in samples for x in s["samples"]]
    assert m["completions/mean_length"] == pytest.approx(np.mean(lengths))
    assert ro.length == 64 and ro.counted.all()
    batch = _batch(ro, [1, -1])
    assert batch.input_ids.shape == (2, G, 64) and batch.weights.tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(batch.advantages[0], ro.advantages[1])


def test_batches_cover_each_iteration_once_and_depend_only_on_the_step():
    n, bs = 10, 4
    per = rollouts.steps_per_iteration(n, bs)
    for it in range(2):
        ids = np.concatenate([rollouts.batch_ids(n, bs, 7, 1, it * per + j) for j in range(per)])
        assert sorted(ids[ids >= 0].tolist()) == list(range(n))
    np.testing.assert_array_equal(rollouts.batch_ids(n, bs, 7, 1, 3), rollouts.batch_ids(n, bs, 7, 1, 3))
    assert rollouts.batch_ids(n, bs, 7, 1, 0).tolist() != rollouts.batch_ids(n, bs, 7, 2, 0).tolist()


@pytest.fixture(scope="module")
def ro_shared():
    out, _ = rollouts.build(_samples(6), scale_rewards="group", mask_truncated_completions=True,
                            drop_zero_std_groups=False, min_length=16, shared_prompt=True)
    return out


def _as_shared_tables(tables, x):
    """The same per-token values in a table of another width (tokens sit at their unshared
    positions in both, all below the shorter width)."""
    out = {}
    for name, t in tables.items():
        w = np.zeros((*t.shape[:2], x), np.float32)
        n = min(x, t.shape[2])
        w[..., :n] = t[..., :n]
        out[name] = w
    return out


def test_shared_prompt_rollout_rows_hold_each_prompt_once(ro, ro_shared):
    assert ro_shared.shared_prompt and ro_shared.length % rollouts.LENGTH_MULTIPLE == 0
    batch = _batch(ro_shared, [0, 1, 2, -1])
    assert isinstance(batch, layouts.SharedPromptBatch) and batch.input_ids.shape == (4, ro_shared.length)
    unshared = _batch(ro, [0, 1, 2, -1])
    for b in range(3):
        grp = ro.groups[b]
        p = len(grp.prompt_ids)
        # the prompt once, then each completion (the later ones behind a copy of the
        # prompt's last token): P + sum_k (C_k + 1) - 1 tokens
        n = p + sum(len(c) + 1 for c in grp.completion_ids) - 1
        assert int(batch.attention_mask[b].sum()) == n
        np.testing.assert_array_equal(batch.input_ids[b, :p], grp.prompt_ids)
        # the same counted completion tokens as unshared (truncated slot 0 masked in both)
        assert int(batch.loss_mask[b].sum()) == int(unshared.loss_mask[b].sum())
        assert not np.any((batch.slot_index[b] == 0) & (batch.loss_mask[b] != 0))
    assert batch.loss_mask[3].sum() == 0 and batch.weights.tolist() == [1, 1, 1, 0]


@pytest.mark.rounding
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_shared_prompt_step_equals_unshared_step(ro, ro_shared, loss_type):
    tables = _tables(ro)
    cfg = _cfg(loss_type)
    a_state, a = _step(cfg, _batch(ro, [0, 1, 2, 3], **tables))
    shared = _batch(ro_shared, [0, 1, 2, 3], **_as_shared_tables(tables, ro_shared.length))
    b_state, b = _step(cfg, shared)
    assert b["num_tokens"] < a["num_tokens"]  # the prompts ran once per group
    # the same float32 program up to the order of the attention's and the reductions' sums:
    # per-token log-probs of the tiny model (logits of a few units) agree to ~1e-6, and
    # every quantity below is a mean of such terms times advantages of at most ~2
    for key in ("loss", "kl", "entropy", "clip_ratio/region_mean", "completion_tokens"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=2e-6, err_msg=key)
    _same_update(a, b, a_state, b_state)


def test_row_layouts_place_token_logps_at_their_unshared_positions(ro):
    from mio_jax.data import batching
    graphdef, params, other = _model()
    model = nnx.merge(graphdef, params, other)
    unshared = _batch(ro, [0, 1, 2, 3])
    want = np.asarray(layouts.token_logps(model, unshared, chunk_size=40, with_entropy=True)
                      .logps_bt)
    groups = [ro.groups[i] for i in range(4)]
    packed = batching.pack(groups, np.arange(4), K=G, R=8, L=32, pad_id=0)
    packed = packed.replace(loss_mask=packed.loss_mask * np.asarray(
        ro.counted[:4][np.maximum(packed.group_index, 0), np.maximum(packed.slot_index, 0)]
        & (packed.group_index >= 0), np.int32))
    for batch in (packed, _batch(rollouts.Rollouts(groups, ro.advantages[:4], ro.counted[:4],
                                                   64, True), [0, 1, 2, 3])):
        got = np.asarray(layouts.token_logps(model, batch, chunk_size=40).logps_bt)
        n = min(got.shape[-1], want.shape[-1])
        assert np.all(got[..., n:] == 0) and np.all(want[..., n:] == 0)
        np.testing.assert_allclose(got[..., :n], want[..., :n], rtol=1e-5, atol=2e-6)
        assert np.count_nonzero(got) == np.count_nonzero(want) > 40


def test_a_table_of_another_layouts_width_fits_where_it_holds_no_token():
    t = np.zeros((2, 3, 8), np.float32)
    t[..., :5] = -1.0
    np.testing.assert_array_equal(rollouts.fit_width(t, 64)[..., :8], t)
    assert rollouts.fit_width(t, 64).shape == (2, 3, 64) and not rollouts.fit_width(t, 64)[..., 8:].any()
    np.testing.assert_array_equal(rollouts.fit_width(t, 5), t[..., :5])
    with pytest.raises(ValueError, match="values past this round's 4 positions"):
        rollouts.fit_width(t, 4)
