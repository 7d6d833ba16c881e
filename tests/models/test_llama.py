"""Decoder parity with torch transformers (golden JSON), execution modes, masks, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mio_jax.models import ModelConfig, generate_ids, load_pretrained
from tiny_checkpoints import CASES, GOLDEN, write_case

IDS = jnp.asarray(GOLDEN["input_ids"], jnp.int32)
MASK = jnp.asarray(GOLDEN["attention_mask"], jnp.int32)


@jax.jit
def _apply(graphdef, state, ids, kwargs):
    return nnx.merge(graphdef, state)(ids, **kwargs)


def fwd(model, ids, **kwargs):
    """Jitted forward (eager nnx dispatch is slow on these shared CPUs)."""
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, ids, kwargs)


_apply = jax.jit(_apply.__wrapped__, static_argnums=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    return {c: write_case(c, str(root / c)) for c in CASES}


@pytest.fixture(scope="module")
def models(folders):
    return {c: load_pretrained(folders[c]) for c in CASES}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(models, case):
    logits = fwd(models[case], IDS, attention_mask=MASK)
    got = np.asarray(logits)[:, GOLDEN["logit_positions"], :]
    want = np.asarray(GOLDEN["cases"][case]["logits"])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_greedy_ids_match_transformers(models, case):
    prompts = [[t for t, m in zip(row, mask) if m]
               for row, mask in zip(GOLDEN["input_ids"], GOLDEN["attention_mask"])]
    out = generate_ids(models[case], prompts, max_new_tokens=GOLDEN["max_new_tokens"])
    assert out == GOLDEN["cases"][case]["greedy_ids"]


def test_config_features_read_from_hf(models):
    assert models["qwen2"].cfg.qkv_bias and not models["qwen2"].cfg.o_bias
    assert models["qwen3"].cfg.qk_norm and models["qwen3"].cfg.head_dim == 16
    assert models["smollm"].cfg.tie_word_embeddings
    assert not hasattr(models["smollm"], "lm_head")
    assert models["mistral"].cfg.sliding_window == 4
    assert dict(models["llama3"].cfg.rope_scaling)["rope_type"] == "llama3"


def _with(model, **changes):
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    clone.cfg = dataclasses.replace(model.cfg, **changes)
    return clone


def test_scan_loop_and_remat_give_identical_logits_and_grads(models):
    base = models["qwen3"]
    loop_remat = _with(base, scan_layers=False, remat_policy="full")
    scan_dots = _with(base, remat_policy="dots_saveable")

    def loss_and_grad(model):
        graphdef, state = nnx.split(model)

        def loss(s):
            return jnp.sum(jnp.tanh(nnx.merge(graphdef, s)(IDS, attention_mask=MASK)))

        return jax.jit(jax.value_and_grad(loss))(state)

    want = np.asarray(fwd(base, IDS, attention_mask=MASK))
    for other in (loop_remat, scan_dots, _with(base, scan_layers=False)):
        np.testing.assert_allclose(np.asarray(fwd(other, IDS, attention_mask=MASK)), want,
                                   atol=1e-6, rtol=0)
    l0, g0 = loss_and_grad(base)
    l1, g1 = loss_and_grad(loop_remat)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_bfloat16_runs_and_is_close(folders, models):
    bf = load_pretrained(folders["llama3"], dtype="bfloat16")
    assert bf.layers.q[...].dtype == jnp.bfloat16
    lo = np.asarray(fwd(bf, IDS, attention_mask=MASK), np.float32)
    hi = np.asarray(fwd(models["llama3"], IDS, attention_mask=MASK))
    assert np.all(np.isfinite(lo))
    assert np.abs(lo - hi).max() < 0.1 * np.abs(hi).max()
    # bf16 compute over fp32 storage
    mixed = load_pretrained(folders["llama3"], dtype="bfloat16", param_dtype="float32")
    assert mixed.layers.q[...].dtype == jnp.float32
    assert np.abs(np.asarray(fwd(mixed, IDS, attention_mask=MASK)) - hi).max() < 0.1 * np.abs(hi).max()


def test_hidden_states_times_output_matrix_are_logits(models):
    for case in ("smollm", "qwen2"):
        m = models[case]
        h = nnx.jit(lambda m, i, k: m.hidden_states(i, attention_mask=k))(m, IDS, MASK)
        assert h.shape == (2, 7, m.cfg.hidden_size)
        assert m.output_matrix().shape == (m.cfg.vocab_size, m.cfg.hidden_size)
        np.testing.assert_allclose(np.asarray(h @ m.output_matrix().T),
                                   np.asarray(fwd(m, IDS, attention_mask=MASK)), atol=1e-5)


def test_packed_segments_equal_separate_sequences(models):
    m = models["qwen2"]
    a, b = [5, 17, 33, 2], [64, 90, 11]
    packed = jnp.asarray([a + b + [0]])
    seg = jnp.asarray([[1] * 4 + [2] * 3 + [0]])
    out = np.asarray(fwd(m, packed, segment_ids=seg))  # positions restart per segment by default
    np.testing.assert_allclose(out[0, :4], np.asarray(fwd(m, jnp.asarray([a])))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 4:7], np.asarray(fwd(m, jnp.asarray([b])))[0], atol=1e-5)


def test_boolean_3d_mask_equals_padding_mask(models):
    m = models["llama2"]
    full = (MASK[:, None, :] > 0) & jnp.ones((2, 7, 7), bool)
    pos = jnp.maximum(jnp.cumsum(MASK, 1) - 1, 0)
    np.testing.assert_allclose(np.asarray(fwd(m, IDS, attention_mask=full, positions=pos)),
                               np.asarray(fwd(m, IDS, attention_mask=MASK)), atol=1e-6)


def test_sharded_load_matches_unsharded_and_is_sharded(folders, models):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = load_pretrained(folders["llama3"], mesh=mesh)
    assert sharded.layers.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded.layers.down[...].sharding.spec == P(None, "tensor", "fsdp")
    assert sharded.embed[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.lm_head[...].sharding.spec == P("tensor", "fsdp")
    assert len(sharded.layers.gate[...].addressable_shards) == 8
    assert sharded.layers.gate[...].addressable_shards[0].data.shape == (2, 16, 32)
    graphdef, state = nnx.split(sharded)
    ids = jnp.concatenate([IDS, IDS])  # batch 4: divisible by data x fsdp
    mask = jnp.concatenate([MASK, MASK])
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m))(
            state, ids, mask)
    want = np.asarray(fwd(models["llama3"], ids, attention_mask=mask))
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=0)


def test_config_round_trip_and_errors(models):
    for case in CASES:
        cfg = models[case].cfg
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    # transformers 4 layout (rope_theta + rope_scaling) reads the same as 5's rope_parameters
    v5 = dict(GOLDEN["cases"]["llama3"]["config"])
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    params = dict(v5["rope_parameters"])
    v4["rope_theta"] = params.pop("rope_theta")
    v4["rope_scaling"] = params
    assert ModelConfig.from_hf(v4) == models["llama3"].cfg
    hf = dict(GOLDEN["cases"]["llama2"]["config"])
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_hf(dict(hf, model_type="gpt2"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf(dict(hf, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf(dict(hf, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                      "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_hf({k: v for k, v in hf.items() if k != "intermediate_size"})


def _masks(B, T):
    """Causal+padding, shared-prompt ([p | c | r], r hidden from c) and packed masks."""
    from mio_jax.models.llama import build_mask

    slots = jnp.broadcast_to(jnp.arange(T), (B, T))
    pad = jnp.arange(T)[None, :] < jnp.array([T, T - 3])[:, None]
    p, c = 4, 5
    kq = jnp.arange(T)
    hidden = (kq[:, None] >= p + c) & (kq[None, :] >= p) & (kq[None, :] < p + c)
    shared = jnp.broadcast_to(~hidden, (B, T, T))
    seg = jnp.array([[1] * 6 + [2] * (T - 8) + [0, 0], [1] * T])
    return {
        "padding": build_mask(B, T, T, q_slots_bt=slots, kv_valid_bs=pad),
        "shared_prompt": build_mask(B, T, T, q_slots_bt=slots, attention_mask=shared),
        "segments": build_mask(B, T, T, q_slots_bt=slots, segment_ids=seg),
    }


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_fused_attention_call_equals_written_out_attention(dtype, tol):
    """The arguments given to jax.nn.dot_product_attention for attention='cudnn' (mask,
    is_causal, scale, GQA layout) produce the written-out attention. Run here through
    XLA; benchmarks/attention_check.py compares the cuDNN kernel itself on a GPU."""
    from mio_jax.models.llama import fused_attention, xla_attention

    B, T, H, KV, hd = 2, 16, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, hd), dtype)
    k = jax.random.normal(ks[1], (B, T, KV, hd), dtype)
    v = jax.random.normal(ks[2], (B, T, KV, hd), dtype)
    for name, mask in _masks(B, T).items():
        rows = mask.any(-1)  # queries with at least one visible key
        want = xla_attention(q, k, v, mask).astype(jnp.float32)
        got = fused_attention(q, k, v, mask, implementation="xla").astype(jnp.float32)
        np.testing.assert_allclose(np.asarray(got)[np.asarray(rows)],
                                   np.asarray(want)[np.asarray(rows)], atol=tol, rtol=tol,
                                   err_msg=name)


def test_attention_option_is_checked():
    base = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    assert ModelConfig(**base, dtype="bfloat16", attention="cudnn").attention == "cudnn"
    with pytest.raises(ValueError, match="attention='flash': expected one of"):
        ModelConfig(**base, attention="flash")
    with pytest.raises(ValueError, match="attention='cudnn' needs dtype bfloat16 or float16"):
        ModelConfig(**base, attention="cudnn")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_score_gradient_is_autodiff_rounded_to_the_compute_dtype(dtype):
    """`attention_scores` (float32 scores, custom backward) has autodiff's gradient: identical in
    float32 (to rounding); in bfloat16 equal to autodiff with the score cotangent rounded to bfloat16
    first, and only bfloat16 matmuls in its backward."""
    from mio_jax.models import llama

    kq, kk, kg = jax.random.split(jax.random.key(3), 3)
    qg = jax.random.normal(kq, (2, 5, 2, 3, 8), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (2, 7, 2, 8), jnp.float32).astype(dtype)
    g = jax.random.normal(kg, (2, 2, 3, 5, 7), jnp.float32)

    def plain(q_, k_):
        return jnp.einsum("btkgh,bskh->bkgts", q_.astype(jnp.float32), k_.astype(jnp.float32))

    out, vjp = jax.vjp(llama.attention_scores, qg, k)
    np.testing.assert_allclose(out, plain(qg, k), rtol=1e-6, atol=1e-6)
    got = vjp(g)
    want = jax.vjp(plain, qg, k)[1](g.astype(dtype).astype(jnp.float32))
    for a, b in zip(got, want):
        assert a.dtype == dtype
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(a, np.float32),
                                   np.asarray(b.astype(dtype), np.float32), rtol=tol, atol=tol)
    if dtype == jnp.bfloat16:
        import re

        text = jax.jit(lambda q_, k_, g_: vjp(g_)).lower(qg, k, g).as_text()
        dots = re.findall(r"dot_general[^\n]*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
        assert len(dots) == 2 and all("bf16>" in a and "bf16>" in b for a, b in dots), dots


@pytest.mark.parametrize("dtype,bias", [(jnp.float32, False), (jnp.float32, True),
                                        (jnp.bfloat16, False)])
def test_mlp_input_backward_equals_autodiff(dtype, bias):
    """`swiglu` (SwiGLU input projections with a hand-written backward) has autodiff's
    value and gradients for every input, biases included; to rounding in bfloat16."""
    from mio_jax.models import llama

    ks = jax.random.split(jax.random.key(7), 6)
    h = jax.random.normal(ks[0], (2, 5, 8), jnp.float32).astype(dtype)
    wg = (0.3 * jax.random.normal(ks[1], (8, 12), jnp.float32)).astype(dtype)
    wu = (0.3 * jax.random.normal(ks[2], (8, 12), jnp.float32)).astype(dtype)
    bg = jax.random.normal(ks[3], (12,), jnp.float32).astype(dtype) if bias else None
    bu = jax.random.normal(ks[4], (12,), jnp.float32).astype(dtype) if bias else None
    g = jax.random.normal(ks[5], (2, 5, 12), jnp.float32).astype(dtype)

    def plain(h_, wg_, wu_, bg_, bu_):
        up32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        gate = jnp.einsum("btd,df->btf", up32(h_), up32(wg_))
        up = jnp.einsum("btd,df->btf", up32(h_), up32(wu_))
        if bg_ is not None:
            gate, up = gate + up32(bg_), up + up32(bu_)
        return jax.nn.silu(gate) * up

    out, vjp = jax.vjp(llama.swiglu, h, wg, wu, bg, bu)
    want_out, want_vjp = jax.vjp(plain, h, wg, wu, bg, bu)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), want_out, **tol)
    got, want = vjp(g), want_vjp(g.astype(jnp.float32))
    assert len(jax.tree.leaves(got)) == (5 if bias else 3)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_backward_recomputing_the_probabilities_equals_autodiff(dtype):
    """`xla_attention` keeps no probabilities for its backward (it recomputes them from q, k
    and the softmax's row maxima and sums): its output equals the softmax attention written
    with jax.nn.softmax bit for bit, and its gradients equal autodiff's of that, with a padded
    key, a fully masked query row and grouped heads."""
    from mio_jax.models import llama

    kq, kk, kv, kg = jax.random.split(jax.random.key(5), 4)
    B, T, H, KV, hd = 2, 6, 4, 2, 8
    q = jax.random.normal(kq, (B, T, H, hd), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, KV, hd), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, KV, hd), jnp.float32).astype(dtype)
    g = jax.random.normal(kg, (B, T, H, hd), jnp.float32).astype(dtype)
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    mask = mask.at[0, :, 0].set(False).at[1, 2, :].set(False)  # padded key; empty row

    def plain(q_, k_, v_):
        qg = q_.reshape(B, T, KV, H // KV, hd)
        s = llama.attention_scores(qg, k_) * hd ** -0.5
        s = jnp.where(mask[:, None, None], s, llama._NEG)
        p = jax.nn.softmax(s, axis=-1).astype(dtype)
        return jnp.einsum("bkgts,bskh->btkgh", p, v_).reshape(B, T, H, hd)

    out, vjp = jax.vjp(lambda *a: llama.xla_attention(*a, mask), q, k, v)
    want_out, want_vjp = jax.vjp(plain, q, k, v)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want_out, np.float32))
    tol = 2e-6 if dtype == jnp.float32 else 2e-2
    for a, b, name in zip(vjp(g), want_vjp(g), "qkv"):
        assert a.dtype == dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol, err_msg=name)
