"""Mixtures of experts (Qwen3-MoE, Mixtral): routing and the grouped matmuls against a
dense reference, router statistics and auxiliary losses in closed form, every layout.
Logits and greedy ids against transformers are in test_llama.py (golden cases qwen3_moe,
mixtral); save/load round trips in test_weights.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mio_jax import testing, train_step
from mio_jax.data import batching, shared_prompt
from mio_jax.models import ModelConfig, init_model, load_pretrained
from mio_jax.models import moe
from tiny_checkpoints import GOLDEN, policy_logps, random_groups, write_case


def test_config_fields_read_from_hf():
    q = ModelConfig.from_hf(GOLDEN["cases"]["qwen3_moe"]["config"])
    assert (q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size) == (6, 2, 24)
    assert q.norm_topk_prob and q.qk_norm and q.moe
    m = ModelConfig.from_hf(GOLDEN["cases"]["mixtral"]["config"])
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size) == (4, 2, 24)
    assert m.norm_topk_prob and not m.qk_norm
    v4 = dict(GOLDEN["cases"]["qwen3_moe"]["config"], num_experts=6)  # transformers 4 name
    v4.pop("num_local_experts")
    assert ModelConfig.from_hf(v4) == q


@pytest.mark.parametrize("change,message", [
    ({"decoder_sparse_step": 2}, "dense layers among the sparse ones"),
    ({"mlp_only_layers": [0]}, "dense layers among the sparse ones"),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok=7 must be in 1..num_experts=6"),
])
def test_unsupported_moe_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(dict(GOLDEN["cases"]["qwen3_moe"]["config"], **change))


def _dense_reference(x, router, gate, up, down, k, norm):
    """Every expert on every token, combined with the top-k weights (zero elsewhere)."""
    probs = jax.nn.softmax(x @ router, axis=-1)
    top, idx = jax.lax.top_k(probs, k)
    if norm:
        top = top / top.sum(-1, keepdims=True)
    w = jnp.zeros_like(probs).at[jnp.arange(x.shape[0])[:, None], idx].set(top)  # [N, E]
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate)) * jnp.einsum("nd,edf->enf", x, up)
    y = jnp.einsum("enf,efd->end", h, down)
    return jnp.einsum("end,ne->nd", y, w)


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_matmuls_equal_the_dense_reference_with_gradients(norm):
    rng = np.random.default_rng(0)
    N, D, E, F, k = 10, 8, 5, 6, 2
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    router = jnp.asarray(rng.normal(size=(D, E)), jnp.float32)
    gate, up = (jnp.asarray(rng.normal(size=(E, D, F)) / 3, jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.normal(size=(E, F, D)) / 3, jnp.float32)
    g = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)

    def ours(*a):
        out, _ = moe.moe_mlp(a[0][None], *a[1:], k=k, norm_topk_prob=norm, act=jax.nn.silu)
        return jnp.sum(out[0] * g)

    def ref(*a):
        return jnp.sum(_dense_reference(*a, k, norm) * g)

    args = (x, router, gate, up, down)
    np.testing.assert_allclose(ours(*args), ref(*args), rtol=1e-5)
    for a, b in zip(jax.grad(ours, argnums=tuple(range(5)))(*args),
                    jax.grad(ref, argnums=tuple(range(5)))(*args)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_router_statistics_and_auxiliary_losses_in_closed_form():
    """Two tokens of one layer, 3 experts, top-1; the second token is padding."""
    x = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2, 2]
    router = jnp.asarray([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # token 0 -> expert 0, 1 -> 2
    E, F = 3, 2
    gate = up = jnp.ones((E, 2, F))
    down = jnp.ones((E, F, 2))
    _, stats = moe.moe_mlp(x, router, gate, up, down, k=1, norm_topk_prob=False,
                           act=jax.nn.silu, token_weight_bt=jnp.asarray([[1.0, 0.0]]))
    p0 = np.exp([2.0, 0.0, 0.0]) / np.exp([2.0, 0.0, 0.0]).sum()
    assert float(stats.tokens) == 1.0 and float(stats.computed) == 1.0
    np.testing.assert_array_equal(stats.expert_tokens, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(stats.expert_probs, p0, rtol=1e-6)
    lse = np.log(np.exp([2.0, 0.0, 0.0]).sum())
    np.testing.assert_allclose(moe.z_loss(stats), lse ** 2, rtol=1e-6)
    # Switch: E * sum_e f_e P_e with f = (1, 0, 0) and P = p0
    np.testing.assert_allclose(moe.load_balancing_loss(stats), 3 * p0[0], rtol=1e-6)
    # summed over two layers, the pooled ratios are unchanged
    two = jax.tree.map(lambda a: 2 * a, stats)
    np.testing.assert_allclose(moe.load_balancing_loss(two), 3 * p0[0], rtol=1e-6)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {c: load_pretrained(write_case(c, str(root / c))) for c in ("qwen3_moe", "mixtral")}


def test_every_token_is_routed_to_k_experts_and_none_is_dropped(moe_models):
    model = moe_models["qwen3_moe"]
    ids = jnp.asarray(GOLDEN["input_ids"])
    mask = jnp.asarray(GOLDEN["attention_mask"])
    _, stats = nnx.jit(lambda m, i, a: m.hidden_states(i, attention_mask=a,
                                                       with_router_stats=True))(model, ids, mask)
    real, layers, k = int(mask.sum()), model.cfg.num_hidden_layers, model.cfg.num_experts_per_tok
    assert float(stats.tokens) == real * layers  # padding tokens do not count
    assert float(stats.expert_tokens.sum()) == real * layers * k
    assert float(stats.computed) == real * layers * k  # rows the grouped matmuls ran: none dropped
    np.testing.assert_allclose(float(stats.expert_probs.sum()), real * layers, rtol=1e-5)


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral"])
def test_every_layout_gives_the_unshared_logps(moe_models, case):
    """Dropless routing is per token: shared-prompt and packed rows give each sequence's
    log-probs as its own padded row does."""
    graphdef, params, other = nnx.split(moe_models[case], nnx.Param, ...)
    cfg = train_step.StepConfig(loss_name="mio", beta=0.1, chunk_size=40, reference="frozen",
                                lengths=True)
    groups = random_groups(4, 2, seed=1)
    unshared = batching.collate(groups, np.arange(4), K=2, L=14)
    want = np.asarray(policy_logps(graphdef, params, other, unshared, cfg))
    assert np.all(want < -1.0)
    for batch in (shared_prompt.to_shared_prompt(unshared, multiple=8),
                  batching.pack(groups, np.arange(4), K=2, R=4, L=32)):
        np.testing.assert_allclose(np.asarray(policy_logps(graphdef, params, other, batch, cfg)),
                                   want, rtol=2e-6, atol=2e-5)


def test_tiny_moe_config_builds_and_decodes():
    model = init_model(testing.tiny_moe_config(), seed=0)
    assert model.layers.expert_gate[...].shape == (2, 4, 32, 16)
    assert model.layers.router[...].shape == (2, 32, 4)
    assert not hasattr(model.layers, "gate")
    bad = dataclasses.replace
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        bad(testing.tiny_moe_config(), moe_intermediate_size=0)


def test_lora_on_a_mixture_adapts_the_attention_and_refuses_the_experts(tmp_path):
    """all-linear on a mixture of experts is q, k, v, o (PEFT finds no linear module in
    transformers' fused experts); naming an expert projection is refused by name."""
    from mio_jax.models import lora as lora_lib
    from mio_jax.models.weights import linear_specs

    cfg = ModelConfig.from_hf(GOLDEN["cases"]["qwen3_moe"]["config"])
    rows = tuple(linear_specs(cfg))
    assert rows == ("q", "k", "v", "o")
    spec = lora_lib.make_spec(rank=2, alpha=4.0, target_modules="all-linear", num_layers=2,
                              rows=rows)
    assert spec.rows == ("q", "k", "v", "o")
    with pytest.raises(ValueError, match=r"\['down_proj'\] are not linear modules"):
        lora_lib.make_spec(rank=2, alpha=4.0, target_modules=["q_proj", "down_proj"],
                           num_layers=2, rows=rows)
    model = load_pretrained(write_case("qwen3_moe", str(tmp_path / "m")), lora=spec)
    ids = jnp.asarray(GOLDEN["input_ids"])
    base = load_pretrained(str(tmp_path / "m"))
    # adapters start as a zero update: the base model's logits
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(base(ids)), atol=1e-6)


def test_the_expert_dispatch_equals_one_device_and_small_batches_fall_back():
    """Under a (fsdp 2, expert 4) mesh the dispatch gives the one-device output and router
    statistics; a batch of 2 rows (not divisible by the 8-way row split) takes GSPMD's
    partitioning of the same computation and gives the same too."""
    from mio_jax import sharding

    rng = np.random.default_rng(3)
    E, D, F = 8, 16, 12
    args = [jnp.asarray(rng.normal(size=s) / 3, jnp.float32)
            for s in ((D, E), (E, D, F), (E, D, F), (E, F, D))]
    f = jax.jit(functools.partial(moe.moe_mlp, k=2, norm_topk_prob=True, act=jax.nn.silu))
    mesh = sharding.make_mesh((1, 2, 1, 4), sharding.KNOWN_AXES)
    for rows in (8, 2):
        h = jnp.asarray(rng.normal(size=(rows, 5, D)), jnp.float32)
        want_out, want_stats = f(h, *args)
        with jax.set_mesh(mesh):
            got_out, got_stats = f(h, *args)
        np.testing.assert_allclose(got_out, want_out, atol=1e-5)
        assert float(got_stats.computed) == float(want_stats.computed) == rows * 5 * 2
        np.testing.assert_allclose(got_stats.expert_probs, want_stats.expert_probs, rtol=1e-5)
