"""Gemma 1, 2, 3 (text): config reading, the pieces Gemma adds (soft-caps, GeGLU, the
query scale, sliding layers by position), decoding and every batch layout against the
plain forward. Logits and greedy ids against transformers are in test_llama.py (the
golden cases gemma, gemma2, gemma3)."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from mio_jax import logps as logps_lib
from mio_jax import train_step
from mio_jax.data import batching, shared_prompt
from mio_jax.models import ModelConfig, generate_ids, load_pretrained, save_pretrained
from mio_jax.models import llama
from mio_jax.models.sampling import generate_groups
from tiny_checkpoints import GOLDEN, policy_logps, random_groups, write_case

GEMMAS = ("gemma", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {c: load_pretrained(write_case(c, str(root / c))) for c in GEMMAS}


def test_config_fields_read_from_hf(models):
    g1, g2, g3 = (models[c].cfg for c in GEMMAS)
    for cfg in (g1, g2, g3):
        assert cfg.norm_weight_offset and cfg.scale_embeddings
        assert cfg.hidden_act == "gelu_pytorch_tanh"
    assert not g1.sandwich_norms and g1.layer_types is None and g1.sliding_window is None
    assert g1.attention_scale == 16 ** -0.5  # head_dim
    assert g2.sandwich_norms and g2.attention_scale == 12 ** -0.5
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (2.0, 3.0)
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert g2.sliding_layers() == (True, False, True) and g2.mixed_layers
    assert g3.qk_norm and g3.final_logit_softcapping is None and g3.sliding_window == 3
    assert g3.rope_local_theta == 1e3 and g3.rope_theta == 1e6
    assert dict(g3.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
    np.testing.assert_allclose(g3.rope_inv_freq(local=True)[1], 1e3 ** (-2 / 16), rtol=1e-6)
    np.testing.assert_allclose(g3.rope_inv_freq()[1], 1e6 ** (-2 / 16) / 4, rtol=1e-6)
    assert "pre_feedforward_layernorm" in "".join(GOLDEN["cases"]["gemma2"]["tensors"])


def test_transformers_4_style_gemma3_config_reads_the_same():
    """Hub configs of Gemma 3 were written by transformers 4: rope_theta, rope_scaling and
    rope_local_base_freq at the top level, the layer pattern as sliding_window_pattern."""
    v5 = GOLDEN["cases"]["gemma3"]["config"]
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=1e6, rope_local_base_freq=1e3, sliding_window_pattern=2,
              rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)
    gemma1 = dict(GOLDEN["cases"]["gemma"]["config"], hidden_act="gelu")  # legacy name
    assert ModelConfig.from_hf(gemma1).hidden_act == "gelu_pytorch_tanh"


def test_bad_gemma_configs_are_refused():
    v5 = GOLDEN["cases"]["gemma3"]["config"]
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        ModelConfig.from_hf(dict(v5, use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="hidden_act.*'silu'.*gemma2"):
        ModelConfig.from_hf(dict(GOLDEN["cases"]["gemma2"]["config"], hidden_activation="silu"))
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        dataclasses.replace(ModelConfig.from_hf(v5), layer_types=("full_attention",) * 2)
    with pytest.raises(ValueError, match="cudnn.*soft-capping"):
        ModelConfig.from_hf(GOLDEN["cases"]["gemma2"]["config"], dtype="bfloat16",
                            attention="cudnn")


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_save_load_round_trip(models, tmp_path, case):
    model = models[case]
    out = str(tmp_path / "out")
    save_pretrained(model, None, out)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["model_type"] == GOLDEN["cases"][case]["config"]["model_type"]
    assert written["layer_types"] == list(model.cfg.layer_types)
    again = load_pretrained(out)
    assert again.cfg == model.cfg
    source = GOLDEN["cases"][case]["tensors"]
    saved = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    assert set(saved) == set(source)  # every HF tensor, named as transformers names it
    ids = jnp.asarray(GOLDEN["input_ids"])
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def _reference_attention(q, k, v, mask, scale, softcap):
    """Grouped attention by autodiff-able jnp (no custom VJP): the reference."""
    B, T, H, hd = q.shape
    kv = k.shape[2]
    k, v = jnp.repeat(k, H // kv, axis=2), jnp.repeat(v, H // kv, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
    s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(mask[:, None], s, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def test_capped_attention_and_its_backward_equal_autodiff():
    rng = np.random.default_rng(0)
    B, T, H, KV, hd = 2, 6, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=s) * 2, jnp.float32)
               for s in ((B, T, H, hd), (B, T, KV, hd), (B, T, KV, hd)))
    mask = jnp.asarray(np.tril(np.ones((T, T), bool)) & (np.arange(T)[:, None]
                                                          - np.arange(T)[None] < 3))[None]
    mask = jnp.broadcast_to(mask, (B, T, T))
    f = functools.partial(llama.xla_attention, mask_bts=mask, scale=0.3, softcap=1.5)
    g = functools.partial(_reference_attention, mask=mask, scale=0.3, softcap=1.5)
    np.testing.assert_allclose(f(q, k, v), g(q, k, v), atol=2e-6)
    w = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32)
    got = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(g(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    # the cap matters at these scores (else the test above could not tell)
    uncapped = llama.xla_attention(q, k, v, mask, scale=0.3)
    assert float(jnp.abs(uncapped - f(q, k, v)).max()) > 0.05


def test_geglu_backward_equals_autodiff():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(8, 12)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)

    def ref(h, wg, wu, b):
        return jax.nn.gelu(h @ wg + b, approximate=True) * (h @ wu)

    def ours(h, wg, wu, b):
        return llama.gated_mlp(h, wg, wu, b, None, "gelu_pytorch_tanh")

    np.testing.assert_allclose(ours(h, wg, wu, bias), ref(h, wg, wu, bias), atol=1e-5)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2, 3))(h, wg, wu, bias)
    want = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2, 3))(h, wg, wu, bias)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5)


def test_chunked_logps_with_the_final_softcap_equal_the_capped_logits():
    """The vocabulary-chunked log-probs (forward and custom backward) with Gemma 2's final
    soft-cap equal log-softmax of the capped logits, in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        h = jnp.asarray(rng.normal(size=(2, 5, 8)) * 3)
        out = jnp.asarray(rng.normal(size=(37, 8)))
        targets = jnp.asarray(rng.integers(0, 37, (2, 5)))
        mask = jnp.asarray([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])

        def ours(h, out):
            return logps_lib.sequence_logps_from_hidden(h, out, targets, mask, chunk_size=8,
                                                        softcap=4.0).sum()

        def ref(h, out):
            z = jnp.einsum("btd,vd->btv", h, out)
            z = jnp.tanh(z / 4.0) * 4.0
            lp = jnp.take_along_axis(jax.nn.log_softmax(z, -1), targets[..., None], -1)[..., 0]
            return jnp.sum(lp * mask)

        np.testing.assert_allclose(ours(h, out), ref(h, out), rtol=1e-12)
        for a, b in zip(jax.grad(ours, (0, 1))(h, out), jax.grad(ref, (0, 1))(h, out)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        uncapped = logps_lib.sequence_logps_from_hidden(h, out, targets, mask, chunk_size=8)
        assert abs(float(uncapped.sum() - ours(h, out))) > 1.0


@jax.jit
def _step_logits(graphdef, state, ids):
    """Prefill of the first 4 tokens, then one token per decode step; every position's
    logits."""
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    cache = model.init_cache(B, T)
    w = model.decode_weights()
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    first, cache = model.decode(ids[:, :4], pos[:, :4], jnp.ones((B, 4), bool), cache, w)
    out = [first]
    for t in range(4, T):
        step, cache = model.decode(ids[:, t:t + 1], pos[:, t:t + 1], jnp.ones((B, 1), bool),
                                   cache, w)
        out.append(step)
    return jnp.concatenate(out, axis=1)


_step_logits = jax.jit(_step_logits.__wrapped__, static_argnums=0)


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_decoding_step_by_step_equals_the_forward(models, case):
    """The KV cache with sliding layers (window 3 of 12 tokens) gives the forward's logits."""
    model = models[case]
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 96, (2, 12)), jnp.int32)
    graphdef, state = nnx.split(model)
    np.testing.assert_allclose(np.asarray(_step_logits(graphdef, state, ids)),
                               np.asarray(model(ids)), atol=2e-5)


def test_rollout_groups_with_sliding_layers(models):
    """The ring cache of `generate_groups` (rows started at different steps, the window
    measured in positions) draws what the static sampler draws (greedy) and, seeded, the
    same samples however the rows are batched, refilled or prefilled."""
    model = models["gemma3"]
    prompts = [[5, 17, 33, 2, 64], [41, 7], [77, 13, 58, 9, 11, 30, 31]]
    static = generate_ids(model, prompts, max_new_tokens=12)
    greedy = generate_groups(model, prompts, num_samples=2, max_new_tokens=12, batch_size=2,
                             chunk_steps=3)
    assert greedy == [s for s in static for _ in range(2)]
    kw = dict(max_new_tokens=12, temperature=1.5, seed=11)
    once = generate_groups(model, prompts, num_samples=3, chunk_steps=64, **kw)
    refilled = generate_groups(model, prompts, num_samples=3, chunk_steps=2, batch_size=3, **kw)
    copies = generate_groups(model, [p for p in prompts for _ in range(3)], num_samples=1, **kw)
    assert refilled == once and copies == once
    assert len({tuple(x) for x in once}) == 9


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_every_layout_gives_the_unshared_logps_with_sliding_windows(models, case):
    """Rows of 10-12 tokens under a window of 3: the shared-prompt rows (completions
    restart their positions) and packed rows (segments restart theirs) measure the window
    in positions, so each sequence sees what it sees alone."""
    graphdef, params, other = nnx.split(models[case], nnx.Param, ...)
    cfg = train_step.StepConfig(loss_name="mio", beta=0.1, chunk_size=40, reference="frozen",
                                lengths=True)
    for K in (2, 3):
        groups = random_groups(4, K, seed=K)
        unshared = batching.collate(groups, np.arange(4), K=K, L=14)
        want = np.asarray(policy_logps(graphdef, params, other, unshared, cfg))
        assert np.all(want < -1.0)
        shared = shared_prompt.to_shared_prompt(unshared, multiple=8)
        packed = batching.pack(groups, np.arange(4), K=K, R=4, L=32)
        for batch in (shared, packed):
            got = np.asarray(policy_logps(graphdef, params, other, batch, cfg))
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)
