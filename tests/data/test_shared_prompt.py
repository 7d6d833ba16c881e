"""Shared-prompt rows: the layout in closed form, and log-probs / train steps equal to the
unshared [B, 2, L] layout on a real (tiny, random) Decoder, on synthetic and real rows."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from mio_jax import layouts, models, testing, train_step
from mio_jax.data import batching, pipeline, shared_prompt
from mio_jax.data.config import default_data_config
from mio_jax.data.tokenize import TokenizedGroup


def _batch(groups, L, K=2):
    return batching.collate(list(groups), np.arange(len(groups)), K=K, L=L)


def _groups(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(5, vocab, int(rng.integers(1, 9))).astype(np.int32)
        comps = tuple(rng.integers(5, vocab, int(rng.integers(1, 9))).astype(np.int32)
                      for _ in range(2))
        out.append(TokenizedGroup(row_id=f"r{i}", prompt_ids=prompt, completion_ids=comps))
    return out


def _model(vocab, seed=0):
    cfg = models.ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    graphdef, p, o = nnx.split(models.init_model(cfg, seed=seed), nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(p), nnx.to_pure_dict(o)


def _cfg(**kw):
    return train_step.StepConfig(**dict(dict(loss_name="mio", beta=0.1, chunk_size=40,
                                             reference="frozen", lengths=True), **kw))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _logps(graphdef, params, other, batch, cfg):
    return train_step.policy_logps(graphdef, params, other, batch, cfg).logps


def test_layout_of_one_pair_in_closed_form():
    g = TokenizedGroup(row_id="a", prompt_ids=np.array([10, 11, 12], np.int32),
                       completion_ids=(np.array([20, 21], np.int32), np.array([30], np.int32)))
    s = shared_prompt.to_shared_prompt(_batch([g], L=8))
    # chosen sequence 10 11 12 20 21, then rejected from the last prompt token: 12 30
    np.testing.assert_array_equal(s.input_ids[0], [10, 11, 12, 20, 21, 12, 30])
    np.testing.assert_array_equal(s.positions[0], [0, 1, 2, 3, 4, 2, 3])
    np.testing.assert_array_equal(s.targets[0], [11, 12, 20, 21, 0, 30, 0])
    np.testing.assert_array_equal(s.loss_mask[0], [0, 0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(s.slot_index[0], [-1, -1, 0, 0, -1, 1, -1])
    np.testing.assert_array_equal(s.shared_code[0], [1, 1, 2, 3, 3, 4, 4])
    vis = np.asarray(layouts.shared_attention_mask(s.shared_code))[0]
    causal = np.tril(np.ones((7, 7), bool))
    seen = vis & causal
    # the rejected copy of token 12 (slot 5) sees 10, 11 and itself, never 12 (slot 2) or chosen
    np.testing.assert_array_equal(seen[5], [1, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(seen[6], [1, 1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(seen[4], [1, 1, 1, 1, 1, 0, 0])


def test_errors_name_the_row():
    g = _groups(2, 50)
    bad = _batch(g, L=20)
    bad.input_ids[1, 1, 0] += 1  # rejected prompt differs
    with pytest.raises(ValueError, match="row 1"):
        shared_prompt.to_shared_prompt(bad)
    with pytest.raises(ValueError, match="length=3"):
        shared_prompt.to_shared_prompt(_batch(g, L=20), length=3)


def test_logps_equal_unshared_on_synthetic_rows_with_padding_groups():
    vocab = 96
    graphdef, params, other = _model(vocab)
    groups = _groups(6, vocab, seed=3) + [None]
    unshared = _batch(groups, L=20)
    shared = shared_prompt.to_shared_prompt(unshared, multiple=8)
    assert shared.input_ids.shape[1] < 2 * 20
    want = np.asarray(_logps(graphdef, params, other, unshared, _cfg()))
    got = np.asarray(_logps(graphdef, params, other, shared, _cfg()))
    assert np.all(want[:6] < -1.0)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)
    np.testing.assert_array_equal(got[6], [0.0, 0.0])
    # completion-only projection gives the same numbers
    got_mt = np.asarray(_logps(graphdef, params, other, shared, _cfg(max_tokens_fraction=0.5)))
    np.testing.assert_allclose(got_mt, want, rtol=2e-6, atol=2e-5)


def test_logps_equal_unshared_on_real_rows(smollm2):
    c = default_data_config()
    c.max_length = 192
    c.eval_path = "embedded"
    prep = pipeline.prepare(c, smollm2, split="eval")
    groups = prep.groups[:4]
    L = int(max(len(g.prompt_ids) + max(len(x) for x in g.completion_ids) for g in groups))
    unshared = _batch(groups, L=L)
    shared = shared_prompt.to_shared_prompt(unshared)
    graphdef, params, other = _model(len(smollm2), seed=1)
    want = np.asarray(_logps(graphdef, params, other, unshared, _cfg(chunk_size=8192)))
    got = np.asarray(_logps(graphdef, params, other, shared, _cfg(chunk_size=8192)))
    assert np.all(want < -100.0)  # real completions of tens of tokens under a random model
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_train_step_equals_unshared_step():
    vocab = 96
    graphdef, params, other = _model(vocab, seed=2)
    unshared = _batch(_groups(4, vocab, seed=5), L=20)
    shared = shared_prompt.to_shared_prompt(unshared)
    tx = optax.sgd(1.0)  # the update is the gradient itself: compare gradients exactly
    consts = train_step.StepConsts(other, jax.tree.map(lambda x: x + 0.01, params))
    outs = []
    for batch in (unshared, shared):
        state = train_step.init_state(params, tx)
        step = jax.jit(functools.partial(train_step.train_step, graphdef=graphdef, tx=tx,
                                         schedule=lambda s: 1e-3, cfg=_cfg()))
        outs.append(step(state, batch, consts))
    (s0, m0), (s1, m1) = outs
    for key in ("loss", "grad_norm", "rewards/margins", "completion_tokens"):
        np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-5, atol=1e-5,
                                   err_msg=key)
    assert float(m0["num_tokens"]) > float(m1["num_tokens"])  # the prompt ran once
    for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-6)


def test_pipeline_rows_have_the_global_batch_length_on_every_process(tmp_path):
    """The row length T comes from the plan's GLOBAL batch: two simulated processes build
    [B/2, T] shares of one shape, and together they hold the one-process batch row for row
    (a length decided per process made the processes' global shapes disagree)."""
    data = testing.write_tiny_data(str(tmp_path / "d.jsonl"), 32, seed=3)
    c = default_data_config()
    c.train_path, c.max_length, c.shared_prompt = data, 32, True
    c.bucketing, c.pad_to_multiple_of = True, 4
    tok = testing.tiny_tokenizer()
    prep = pipeline.prepare(c, tok, split="train")

    def batches(index, count):
        it = pipeline.make_pipeline(c, tok, split="train", batch_size=8, seed=1, prepared=prep,
                                    process_index=index, process_count=count)
        return [next(it) for _ in range(4)]

    whole = batches(0, 1)
    halves = [batches(p, 2) for p in (0, 1)]
    lengths = set()
    for step, full in enumerate(whole):
        assert isinstance(full, layouts.SharedPromptBatch)
        a, b = halves[0][step], halves[1][step]
        assert a.input_ids.shape == b.input_ids.shape == (4, full.input_ids.shape[1])
        lengths.add(full.input_ids.shape[1])
        for field in ("input_ids", "targets", "loss_mask", "positions", "shared_code",
                      "slot_index", "weights", "example_id"):
            np.testing.assert_array_equal(
                np.concatenate([getattr(a, field), getattr(b, field)]), getattr(full, field),
                err_msg=field)
    assert all(t % 4 == 0 for t in lengths)


def test_a_group_of_three_completions_in_closed_form():
    g = TokenizedGroup(row_id="a", prompt_ids=np.array([10, 11, 12], np.int32),
                       completion_ids=(np.array([20, 21], np.int32), np.array([30], np.int32),
                                       np.array([40, 41, 42], np.int32)))
    s = shared_prompt.to_shared_prompt(_batch([g], L=8, K=3))
    np.testing.assert_array_equal(s.input_ids[0], [10, 11, 12, 20, 21, 12, 30, 12, 40, 41, 42])
    np.testing.assert_array_equal(s.positions[0], [0, 1, 2, 3, 4, 2, 3, 2, 3, 4, 5])
    np.testing.assert_array_equal(s.slot_index[0], [-1, -1, 0, 0, -1, 1, -1, 2, 2, 2, -1])
    np.testing.assert_array_equal(s.shared_code[0], [1, 1, 2, 3, 3, 4, 4, 5, 5, 5, 5])
    assert shared_prompt.shared_row_length([5, 4, 6], 3) == 11
    seen = np.asarray(layouts.shared_attention_mask(s.shared_code))[0] & np.tril(np.ones((11, 11), bool))
    # completion 2's tokens see the prompt without its last token, and their own segment
    np.testing.assert_array_equal(seen[9], [1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(seen[6], [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0])


def test_logps_of_groups_of_four_equal_unshared():
    vocab = 96
    graphdef, params, other = _model(vocab, seed=4)
    rng = np.random.default_rng(9)
    groups = [TokenizedGroup(row_id=f"g{i}", prompt_ids=rng.integers(5, vocab, 1 + i).astype(np.int32),
                             completion_ids=tuple(rng.integers(5, vocab, int(rng.integers(1, 9)))
                                                  .astype(np.int32) for _ in range(4)))
              for i in range(5)] + [None]
    unshared = _batch(groups, L=16, K=4)
    shared = shared_prompt.to_shared_prompt(unshared, multiple=8)
    want = np.asarray(_logps(graphdef, params, other, unshared, _cfg()))
    got = np.asarray(_logps(graphdef, params, other, shared, _cfg()))
    assert np.all(want[:5] < -1.0) and want.shape == (6, 4)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)
