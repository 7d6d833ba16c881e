"""Reward functions (mio_jax.rewards): TRL's built-ins equal TRL's, verifier rewards,
TRL-style custom functions, weights, missing values and the logged metrics."""

import json
import pathlib

import numpy as np
import pytest

from mio_jax import rewards

GOLDEN = json.loads((pathlib.Path(__file__).parent / "losses" / "golden_trl_grpo.json").read_text())
TRL = GOLDEN["reward_funcs"]


def _score(names, completions, examples, weights="", **kw):
    funcs = rewards.parse(names, weights, max_completion_length=kw.pop("max_len", 20),
                          soft_punish_cache=kw.pop("cache", 8))
    ids = kw.pop("ids", [[1] * len(c) for c in completions])
    prompts = [[{"role": "user", "content": "q"}]] * len(completions)
    return funcs, rewards.score(funcs, prompts, completions, ids, examples)


def test_think_format_and_soft_overlong_equal_trl():
    c = TRL["think_format"]["completions"]
    _, table = _score("think_format", c, [{}] * len(c))
    assert table[:, 0].tolist() == TRL["think_format"]["rewards"]
    o = TRL["soft_overlong_punishment"]
    ids = [[1] * n for n in o["lengths"]]
    _, table = _score("soft_overlong_punishment", [""] * len(ids), [{}] * len(ids), ids=ids,
                      max_len=o["max_completion_len"], cache=o["soft_punish_cache"])
    np.testing.assert_allclose(table[:, 0], o["rewards"], rtol=1e-15)


def test_accuracy_uses_each_examples_verifier_and_format_reads_the_marker():
    completions = ["The answer is 12", "#### 12", "13", "so 12"]
    examples = [{"answer": "12", "verifier": "exact_number"},
                {"answer": "12", "verifier": "exact_string"},
                {"answer": "12", "verifier": "exact_number"},
                {"answer": "so 12", "verifier": "exact_string"}]
    funcs, table = _score("accuracy,format,verifier:exact_number", completions, examples,
                          weights="1,0.5,2")
    assert table.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 0, 1]]
    np.testing.assert_allclose(rewards.combine(table, funcs), [3.5, 3.5, 0, 3])
    m = rewards.metrics(table, [f.name for f in funcs])
    assert m["rewards/format/mean"] == 0.5
    np.testing.assert_allclose(m["rewards/accuracy/std"], np.std([1, 1, 0, 1], ddof=1))


def test_a_custom_trl_style_reward_and_missing_values():
    completions = ["abc", "", "de"]
    funcs, table = _score("mio_jax.testing:length_reward,format", completions, [{}] * 3,
                          weights="0.5,1")
    assert np.isnan(table[1, 0]) and table[0, 0] == 3.0
    total = rewards.combine(table, funcs)
    np.testing.assert_allclose(total, [1.5, 0.0, 1.0])  # format scored the empty answer 0
    funcs, table = _score("mio_jax.testing:length_reward", completions, [{}] * 3)
    assert np.isnan(rewards.combine(table, funcs)[1])  # no function scored it: NaN
    assert rewards.metrics(table, [f.name for f in funcs])[
        "rewards/mio_jax.testing:length_reward/mean"] == 2.5


@pytest.mark.parametrize("names,weights,match", [
    ("", "", "empty"),
    ("accuracy,accuracy", "", "twice"),
    ("accuracy,format", "1", "1 values for 2"),
    ("accuracy", "x", "not a list of numbers"),
    ("acuracy", "", "unknown reward 'acuracy'.*accuracy"),
    ("verifier:nope", "", "unknown verifier 'nope'"),
    ("no_such_module:f", "", "cannot import"),
])
def test_bad_specs_are_named(names, weights, match):
    with pytest.raises(ValueError, match=match):
        rewards.parse(names, weights, max_completion_length=20)


def test_soft_overlong_needs_a_cache_inside_the_limit():
    with pytest.raises(ValueError, match="soft_punish_cache"):
        rewards.parse("soft_overlong_punishment", max_completion_length=20, soft_punish_cache=0)
