"""The pure train step: closed forms, exact accumulation, sharded == single device,
precomputed == frozen reference, padding and packing invariance.

The model is the real tiny Decoder; steps run on the same three batches so that
each compiled program is reused across tests (module-scoped fixtures).
"""

import functools
import math

import jax
import numpy as np
import pytest
from flax import nnx

import tolerance
from mio_jax import layouts, logps, losses, models, optim, sharding, testing, train_step
from mio_jax.data import batching
from mio_jax.data.tokenize import TokenizedGroup

VOCAB = testing.VOCAB
pytestmark = pytest.mark.rounding


def _groups(n, seed=0, k=2):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(5, VOCAB, int(rng.integers(2, 7))).astype(np.int32)
        comps = tuple(rng.integers(5, VOCAB, int(rng.integers(1, 8))).astype(np.int32)
                      for _ in range(k))
        out.append(TokenizedGroup(row_id=f"r{i}", prompt_ids=prompt, completion_ids=comps))
    return out


def _batch(groups, L=16, K=2):
    return batching.collate(list(groups), np.arange(len(groups)), K=K, L=L)


def _model(seed=0, model_cfg=None):
    model = models.init_model(model_cfg or testing.tiny_model_config(), seed=seed)
    graphdef, p, o = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(p), nnx.to_pure_dict(o), p


def _cfg(**kw):
    base = dict(loss_name="mio", beta=0.1, chunk_size=40, reference="frozen", lengths=False)
    base.update(kw)
    return train_step.StepConfig(**base)


BATCHES = [_batch(_groups(8, seed=s)) for s in (1, 2, 3)]
LR = 1e-2  # _run's learning rate


def _run(cfg, batches, *, mesh=None, lr=LR, starts=None, model_cfg=None):
    """Steps from the seed-0 tiny model (``model_cfg``: another tiny config); the frozen
    reference is its initial params. ``starts``: a list that receives the parameters each
    step starts from."""
    graphdef, params, other, pstate = _model(0, model_cfg)
    tx, sched = optim.make_optimizer(learning_rate=lr, total_steps=10, warmup_steps=0,
                                     schedule="constant", max_grad_norm=1.0)
    fn = functools.partial(train_step.train_step, graphdef=graphdef, tx=tx, schedule=sched,
                           cfg=cfg)
    consts = train_step.StepConsts(other, params if cfg.reference == "frozen" else None)
    if mesh is None:
        state = train_step.init_state(params, tx)
        step = jax.jit(fn)
        ctx = _Null()
    else:
        pspecs = sharding.state_partition_specs(pstate, None, mesh)
        state_sh = sharding.named(mesh, train_step.state_specs(tx, params, pspecs))
        consts = train_step.StepConsts(other, jax.device_put(params, state_sh.params))
        state = jax.jit(lambda p: train_step.init_state(p, tx),
                        out_shardings=state_sh)(consts.ref_params)
        batch_sh = sharding.batch_sharding(mesh)
        step = jax.jit(fn, in_shardings=(state_sh, batch_sh, None),
                       out_shardings=(state_sh, None), donate_argnums=0)
        batches = [jax.device_put(b, batch_sh) for b in batches]
        ctx = jax.set_mesh(mesh)
    history = []
    with ctx:
        for b in batches:
            if starts is not None:
                starts.append(jax.device_get(state.params))
            state, m = step(state, b, consts)
            history.append({k: float(v) for k, v in jax.device_get(m).items()})
    return jax.device_get(state.params), history


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@functools.lru_cache(maxsize=None)
def _baseline_run():
    """``(params, history, starts)`` of the baseline: 3 steps, one device."""
    starts = []
    params, history = _run(_cfg(), BATCHES, starts=starts)
    return params, history, starts


def _baseline():
    return _baseline_run()[:2]


def _close_tree(a, b, updates=len(BATCHES)):
    """Parameters after ``updates`` steps agree to the rounding allowance (tests/tolerance.py)."""
    tolerance.assert_params_close(a, b, learning_rate=LR, updates=updates)


@functools.lru_cache(maxsize=None)
def _baseline_margins() -> list:
    """Per step of the baseline: every pair's reward margin with the parameters that step
    starts from (the reference is the seed-0 model, the policy of step 0)."""
    graphdef, ref, other, _ = _model(0)
    cfg = _cfg()
    fwd = jax.jit(lambda p, b: train_step.policy_logps(graphdef, p, other, b, cfg).logps)
    out = []
    for params, batch in zip(_baseline_run()[2], BATCHES):
        z = np.asarray(fwd(params, batch)) - np.asarray(fwd(ref, batch))  # [B, K]
        out.append(cfg.beta * (z[:, 0] - z[:, 1]))
    return out


def _close_history(h1, h2):
    """Metrics of each step agree (tests/tolerance.py); the reward accuracy, a step function
    of the margins, is compared exactly where every pair's margin is clear of zero (not at
    step 0, where the policy is the reference and every margin is zero up to rounding)."""
    for i, (a, b) in enumerate(zip(h1, h2)):
        tolerance.assert_rows_close(b, a, beta=_cfg().beta, updates=i, what=f"step {i}",
                                    margins=_baseline_margins()[i])


def test_first_step_loss_is_ln4_when_policy_equals_reference():
    _, hist = _baseline()
    m = hist[0]
    assert m["loss"] == pytest.approx(math.log(4), abs=1e-6)  # method.md: L_MIO(0, 0) = ln 4
    assert m["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert m["grad_norm"] > 0 and "update_norm" not in m and "param_norm" not in m  # opt-in
    assert m["learning_rate"] == pytest.approx(1e-2)
    assert m["num_groups"] == 8 and m["completion_tokens"] == BATCHES[0].loss_mask.sum()
    # later steps see a policy that moved away from the reference
    assert abs(hist[2]["loss"] - math.log(4)) > 1e-4
    assert abs(hist[1]["rewards/chosen"]) > 1e-5


def test_weight_norms_are_the_norms_of_the_update_and_new_params():
    """`weight_norms=True` adds param_norm (after the update) and update_norm, which equal
    the norms of the new weights and of new minus old weights; nothing else changes."""
    params1, hist = _run(_cfg(weight_norms=True), BATCHES[:1])
    params0 = _model(0)[1]
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    new, old = flat(params1), flat(params0)
    assert hist[0]["param_norm"] == pytest.approx(np.linalg.norm(new), rel=1e-5)
    assert hist[0]["update_norm"] == pytest.approx(np.linalg.norm(new - old), rel=1e-3)
    base_params, base_hist = _baseline()
    assert {k: v for k, v in hist[0].items() if not k.endswith("_norm") or k == "grad_norm"} \
        == pytest.approx(base_hist[0])
    jax.tree.map(np.testing.assert_array_equal, params1, _run(_cfg(), BATCHES[:1])[0])


def test_grad_clipped_reports_whether_the_norm_exceeded_the_clip():
    """With ``max_grad_norm`` the step reports ``grad_clipped``: 1 exactly when the step's
    gradient norm exceeds the clip; nothing else changes."""
    _, base = _baseline()
    norms = [h["grad_norm"] for h in base]
    low, mid, high = sorted(norms)  # clips between them (far from rounding's reach)
    for clip in ((low + mid) / 2, (mid + high) / 2):
        _, hist = _run(_cfg(max_grad_norm=clip), BATCHES)
        assert [h["grad_clipped"] for h in hist] == [float(n > clip) for n in norms]
        assert [{k: v for k, v in h.items() if k != "grad_clipped"} for h in hist] == base


def test_grad_accumulation_4x2_equals_one_batch_of_8():
    p1, h1 = _baseline()
    p4, h4 = _run(_cfg(grad_accum_steps=4), BATCHES)
    _close_history(h1, h4)
    _close_tree(p1, p4)


def test_sharded_2x2x2_equals_single_device():
    p1, h1 = _baseline()
    p8, h8 = _run(_cfg(), BATCHES, mesh=sharding.make_mesh((2, 2, 2)))
    _close_history(h1, h8)
    _close_tree(p1, p8)


def test_gemma_sharded_2x2x2_equals_single_device():
    """The tiny Gemma 3 (a sliding and a global layer, soft-caps, GeGLU, sandwich norms)
    trains the same over data x fsdp x tensor as on one device."""
    gemma = testing.tiny_gemma_config()
    p1, h1 = _run(_cfg(), BATCHES, model_cfg=gemma)
    p8, h8 = _run(_cfg(), BATCHES, mesh=sharding.make_mesh((2, 2, 2)), model_cfg=gemma)
    for i, (a, b) in enumerate(zip(h1, h8)):
        tolerance.assert_rows_close(b, a, beta=_cfg().beta, updates=i, what=f"step {i}",
                                    keys=("loss", "grad_norm", "rewards/margins",
                                          "logps/chosen", "logps/rejected"))
    _close_tree(p1, p8)


def test_moe_sharded_over_data_fsdp_tensor_expert_equals_single_device():
    """The tiny Qwen3-MoE (4 experts, 2 a token) trains the same with its experts split
    over an expert axis, each expert's width over tensor and the batch over fsdp x
    expert, as on one device."""
    tiny_moe = testing.tiny_moe_config()
    mesh = sharding.make_mesh((1, 2, 2, 2), sharding.KNOWN_AXES)
    p1, h1 = _run(_cfg(), BATCHES, model_cfg=tiny_moe)
    p8, h8 = _run(_cfg(), BATCHES, mesh=mesh, model_cfg=tiny_moe)
    for i, (a, b) in enumerate(zip(h1, h8)):
        tolerance.assert_rows_close(b, a, beta=_cfg().beta, updates=i, what=f"step {i}",
                                    keys=("loss", "grad_norm", "rewards/margins",
                                          "logps/chosen", "logps/rejected"))
    _close_tree(p1, p8)
    # the expert-parallel dispatch ran every assignment (k = 2 a token) and counted the
    # router as one device does
    for a, b in zip(h1, h8):
        assert a["router/assignments_per_token"] == b["router/assignments_per_token"] == 2.0
        np.testing.assert_allclose(b["router/load_balancing_loss"],
                                   a["router/load_balancing_loss"], rtol=1e-4)
    specs = sharding.state_partition_specs(
        nnx.state(models.init_model(tiny_moe), nnx.Param), None, mesh)
    assert specs["layers"]["expert_gate"] == jax.sharding.PartitionSpec(
        None, "expert", "fsdp", "tensor")


def test_moe_router_losses_are_added_with_their_coefficients_and_logged():
    tiny_moe = testing.tiny_moe_config()
    p0, (off,) = _run(_cfg(), BATCHES[:1], model_cfg=tiny_moe)
    p1, (on,) = _run(_cfg(router_aux_loss_coef=0.5, router_z_loss_coef=0.1), BATCHES[:1],
                     model_cfg=tiny_moe)
    for key in ("router/load_balancing_loss", "router/z_loss", "router/expert_load_max"):
        assert on[key] == off[key], key  # the same forward; only the objective differs
    np.testing.assert_allclose(on["loss"], off["loss"] + 0.5 * off["router/load_balancing_loss"]
                               + 0.1 * off["router/z_loss"], rtol=1e-6)
    assert off["router/assignments_per_token"] == 2.0  # k = 2, nothing dropped
    assert off["router/expert_load_max"] > 1.0 > off["router/expert_load_min"] >= 0.0
    moved = np.abs(p1["layers"]["router"] - p0["layers"]["router"]).max()
    assert moved > 0  # the router losses have a gradient


def test_precomputed_reference_equals_frozen():
    graphdef, ref, other, _ = _model(0)
    cfg_p = _cfg(reference="precomputed")
    ref_fn = jax.jit(functools.partial(train_step.reference_logps, graphdef, cfg=cfg_p))
    with_ref = [b.replace(ref_logps=np.asarray(ref_fn(ref, other, b))) for b in BATCHES]
    p_f, h_f = _baseline()
    p_p, h_p = _run(cfg_p, with_ref)
    _close_history(h_f, h_p)
    _close_tree(p_f, p_p)


# ---- eval step (no optimizer): registry parity, padding, packing, reference-free ----

def _eval(cfg, batch, params_seed=4, ref_seed=0):
    graphdef, params, other, _ = _model(params_seed)
    ref = _model(ref_seed)[1]
    fn = jax.jit(functools.partial(train_step.eval_step, graphdef=graphdef, cfg=cfg))
    sums, counts, denom = jax.device_get(fn(params, batch, train_step.StepConsts(other, ref)))
    out = {k: float(v) / float(denom) for k, v in sums.items()}
    out.update({k: float(v) for k, v in counts.items()})
    return out, (graphdef, params, ref, other)


def test_eval_loss_equals_registry_on_full_logits():
    """Chunked hidden-state log-probs + registry == full logits + registry."""
    batch = BATCHES[0]
    got, (graphdef, params, ref, other) = _eval(_cfg(), batch)

    def full(p):
        model = nnx.merge(graphdef, p, other)
        flat = {k: getattr(batch, k).reshape(16, 16) for k in ("input_ids", "attention_mask", "positions",
                                                      "targets", "loss_mask")}
        lg = model(flat["input_ids"], attention_mask=flat["attention_mask"],
                   positions=flat["positions"])
        return logps.sequence_logps(lg, flat["targets"], flat["loss_mask"]).reshape(8, 2)

    want, metrics = losses.compute_group("mio", policy_logps=full(params), ref_logps=full(ref),
                                         beta=0.1)
    assert got["loss"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert got["rewards/margins"] == pytest.approx(float(metrics["rewards/margins"].mean()),
                                                   rel=1e-4, abs=1e-6)
    assert abs(got["loss"] - math.log(4)) > 1e-3  # policy != reference here


def test_padding_groups_change_nothing():
    real = _groups(6, seed=14)
    b8 = _batch(real + [None, None])
    assert (b8.weights[6:] == 0).all()
    got8, _ = _eval(_cfg(), b8)
    got6, _ = _eval(_cfg(), _batch(real))
    for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "num_groups",
              "completion_tokens"):
        assert got8[k] == pytest.approx(got6[k], rel=1e-5), k


def test_packed_rows_equal_padded_batch():
    groups = _groups(8, seed=1)  # the groups of BATCHES[0]
    packed = batching.pack(groups, np.arange(8), K=2, R=4, L=32)
    got_p, _ = _eval(_cfg(), packed)
    got_u, _ = _eval(_cfg(), BATCHES[0])
    for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "completion_tokens"):
        assert got_p[k] == pytest.approx(got_u[k], rel=1e-5), k


def test_reference_free_simpo_matches_registry():
    cfg = _cfg(loss_name="simpo", beta=2.0, reference="none", lengths=True,
               loss_hparams=(("simpo_gamma", 0.5),))
    batch = BATCHES[1]
    got, (graphdef, params, _, other) = _eval(cfg, batch)
    model = nnx.merge(graphdef, params, other)
    hidden = model.hidden_states(batch.input_ids.reshape(16, 16),
                                 attention_mask=batch.attention_mask.reshape(16, 16),
                                 positions=batch.positions.reshape(16, 16))
    lp = logps.sequence_logps_from_hidden(hidden, model.output_matrix(),
                                          batch.targets.reshape(16, 16),
                                          batch.loss_mask.reshape(16, 16)).reshape(8, 2)
    want, _ = losses.compute_group("simpo", policy_logps=lp, ref_logps=None, beta=2.0,
                                   lengths=batch.loss_mask.sum(-1), simpo_gamma=0.5)
    assert got["loss"] == pytest.approx(float(want.mean()), rel=1e-5)


def _full_token_stats(graphdef, p, other, batch, with_sq=False):
    b, k, l = batch.input_ids.shape
    model = nnx.merge(graphdef, p, other)
    lg = model(batch.input_ids.reshape(b * k, l),
               attention_mask=batch.attention_mask.reshape(b * k, l),
               positions=batch.positions.reshape(b * k, l))
    st = logps.token_stats(lg.reshape(b, k, l, -1), batch.targets, batch.loss_mask,
                           with_log_sum_sq=with_sq)
    return st


def test_k_way_groups_with_a_multi_negative_loss():
    groups = _groups(8, seed=21, k=3)
    batch = _batch(groups, K=3)
    got, (graphdef, params, ref, other) = _eval(_cfg(loss_name="js_multi"), batch)
    pol = _full_token_stats(graphdef, params, other, batch).logps_bt.sum(-1)
    rf = _full_token_stats(graphdef, ref, other, batch).logps_bt.sum(-1)
    want, _ = losses.compute_group("js_multi", policy_logps=pol, ref_logps=rf, beta=0.1)
    assert pol.shape == (8, 3)
    assert got["loss"] == pytest.approx(float(want.mean()), rel=1e-5)


@pytest.mark.parametrize("loss_name", ["js_multi", "infonce"])
def test_padding_groups_change_nothing_for_multi_negative_losses(loss_name):
    """A padding group (weight 0, no valid completion) must not turn the batch loss NaN."""
    real = _groups(6, seed=22, k=3)
    got8, _ = _eval(_cfg(loss_name=loss_name), _batch(real + [None, None], K=3))
    got6, _ = _eval(_cfg(loss_name=loss_name), _batch(real, K=3))
    for k in ("loss", "mi/js", "rewards/margins", "logps/chosen", "num_groups"):
        assert np.isfinite(got8[k]), k
        assert got8[k] == pytest.approx(got6[k], rel=1e-5), k
    params, history = _run(_cfg(loss_name=loss_name), [_batch(real + [None, None], K=3)])
    assert np.isfinite(history[0]["loss"]) and np.isfinite(history[0]["grad_norm"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_ld_dpo_and_wpo_weighting_follow_the_logps_library():
    batch = BATCHES[2]
    cfg = _cfg(loss_name="dpo", ld_alpha=0.5, use_weighting=True)
    got, (graphdef, params, ref, other) = _eval(cfg, batch)
    pst = _full_token_stats(graphdef, params, other, batch, with_sq=True)
    rst = _full_token_stats(graphdef, ref, other, batch)
    pol = logps.ld_sequence_logps(pst.logps_bt, batch.loss_mask, 0.5)
    rf = logps.ld_sequence_logps(rst.logps_bt, batch.loss_mask, 0.5)
    w = logps.wpo_weights(pst.logps_bt, pst.log_sum_sq_probs_bt, batch.loss_mask)
    per, _ = losses.compute_group("dpo", policy_logps=pol, ref_logps=rf, beta=0.1)
    assert got["loss"] == pytest.approx(float((w * per).mean()), rel=1e-5)
    plain, _ = _eval(_cfg(loss_name="dpo"), batch)
    assert abs(plain["loss"] - got["loss"]) > 1e-4


def test_projection_fits_counts_each_micro_batch():
    """Row j*A + i belongs to micro-batch i; each micro-batch must fit its own block."""
    cfg = train_step.StepConfig(loss_name="dpo", beta=0.1, grad_accum_steps=2,
                                max_tokens_fraction=0.25)
    shape = (4, 2, 16)  # micro-batch mask [2, 2, 16]: 64 slots, block 16
    assert layouts.completion_block(cfg.max_tokens_fraction, (2, 2, 16)) == 16
    assert train_step.projection_fits(cfg, shape, np.array([8, 8, 8, 8]))  # 16 and 16
    assert not train_step.projection_fits(cfg, shape, np.array([9, 0, 8, 0]))  # 17 and 0
    assert train_step.projection_fits(cfg, shape, np.array([9, 0, 7, 0]))
    off = train_step.StepConfig(loss_name="dpo", beta=0.1)
    assert train_step.projection_fits(off, shape, np.array([32, 32, 32, 32]))


@pytest.mark.parametrize("untied", [False, True])
def test_bf16_compute_step_has_no_float32_matmul(untied):
    """Float32 master weights, bfloat16 compute: every dot of the whole step (both
    forwards, the chunked vocabulary projection and its backward) takes bfloat16
    operands. A float32 output matrix there once made the largest matmul of a 1B model
    a TF32 one (a quarter of the H100 step)."""
    import re

    import optax

    cfg = testing.tiny_model_config(dtype="bfloat16", param_dtype="float32",
                                             tie_word_embeddings=not untied)
    model = models.init_model(cfg, seed=0)
    assert model.output_matrix().dtype == jax.numpy.bfloat16
    graphdef, p, o = nnx.split(model, nnx.Param, ...)
    params, other = nnx.to_pure_dict(p), nnx.to_pure_dict(o)
    tx = optax.adamw(1e-3)
    state = train_step.init_state(params, tx)
    step = functools.partial(train_step.train_step, graphdef=graphdef, tx=tx,
                             schedule=optax.constant_schedule(1e-3), cfg=_cfg())
    text = jax.jit(step).lower(state, BATCHES[0], train_step.StepConsts(other, params)).as_text()
    dots = re.findall(r"stablehlo\.dot_general[^\n]*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    assert len(dots) > 20
    f32 = [d for d in dots if "f32>" in d[0] or "f32>" in d[1]]
    assert not f32, f"{len(f32)} of {len(dots)} dots take float32 operands: {f32[:3]}"


def test_packed_rows_in_micro_batches_train_like_the_padded_batches():
    """Packed per micro-batch (``batching.pack(micro_batches=2)``), the step splits the rows
    into two micro-batches of whole groups and trains like the unshared layout."""
    packed = [batching.pack(_groups(8, seed=s), np.arange(8), K=2, R=8, L=32, micro_batches=2)
              for s in (1, 2, 3)]
    for b in packed:  # row r holds only groups b with b % 2 == r % 2
        gi = np.asarray(b.group_index)
        for r in range(gi.shape[0]):
            assert set(gi[r][gi[r] >= 0] % 2) <= {r % 2}
    params, hist = _run(_cfg(grad_accum_steps=2), packed)
    base_params, base_hist = _baseline()
    _close_tree(params, base_params)
    _close_history(hist, base_hist)
