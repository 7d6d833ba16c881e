"""GRPO rounds (online.enabled + grpo.enabled) on the tiny model: the rollouts' rewards and
advantages, the round and step metrics, kill-and-resume, and LoRA with the base as the
reference."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import run_compare
import tolerance

from mio_jax import losses, online, rollouts, testing, train

M, G, B, R = 6, 4, 2, 2  # prompts per round, answers per prompt, groups per step, rounds
STEPS = -(-M // B)       # steps per round (one iteration)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo") / "questions.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            f.write(json.dumps({"question": f"q: {i}+{i % 5}=", "answer": str(i + i % 5)}) + "\n")
    return str(path)


def _overrides(questions, **extra):
    base = {"online.enabled": True, "grpo.enabled": True, "online.rounds": R,
            "online.prompts_per_round": M, "grpo.num_generations": G, "online.tasks": "",
            "online.jsonl": questions, "online.verifier": "mio_jax.testing:parity_verifier",
            "online.max_new_tokens": 8, "online.temperature": 8.0,
            "online.sample_batch_size": 32, "online.eval_every_rounds": 0, "online.system": "",
            "data.max_length": 64, "data.shared_prompt": False, "data.packing": False,
            "reference.mode": "precomputed", "data.eval_path": "", "eval.at_start": False,
            "eval.every_steps": 0, "eval.reasoning_tasks": "", "train.batch_size": B,
            "grpo.loss_type": "dapo", "grpo.beta": 0.04,
            "grpo.reward_funcs": "accuracy,mio_jax.testing:length_reward",
            "grpo.reward_weights": "1.0,0.01", "checkpoint.every_steps": 2,
            "checkpoint.export_hf": False, "optim.learning_rate": 1e-3,
            "mesh.shape": (1, 2, 4)}  # 2-way data parallel (B = 2 groups), 4-way tensor
    base.update(extra)
    return base


def _round(workdir, r, name):
    return os.path.join(workdir, "online", f"round_{r:04d}", name)


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def run(tiny, tiny_config, questions, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("grpo_run") / "run")
    out = online.train_and_evaluate(tiny_config(*tiny, **_overrides(questions)), work)
    return work, out


def test_rewards_advantages_and_round_metrics_follow_from_the_samples(run):
    work, out = run
    assert out["step"] == R * STEPS
    for r in range(R):
        scored = _jsonl(_round(work, r, "rollouts.jsonl"))
        done = json.load(open(_round(work, r, "done.json")))
        assert len(scored) == M and all(len(p["samples"]) == G for p in scored)
        flat = [s for p in scored for s in p["samples"]]
        for s in flat:  # accuracy is the verifier's verdict; the custom reward the length
            assert s["rewards"]["accuracy"] == testing.parity_verifier(s["text"], None) == s["score"]
            expected_len = float(len(s["text"])) if s["text"] else None
            assert s["rewards"]["mio_jax.testing:length_reward"] == expected_len
            weighted = s["score"] + (0.01 * expected_len if expected_len else 0.0)
            assert s["reward"] == pytest.approx(weighted, rel=1e-12)
            assert len(s["ids"]) == s["tokens"] > 0
        rewards = np.asarray([s["reward"] for s in flat])
        groups = rewards.reshape(M, G)
        # the round's reward statistics are float32 (jax without x64): a few float32 roundings
        assert done["reward"] == pytest.approx(rewards.mean(), rel=1e-6)
        assert done["reward_std"] == pytest.approx(rewards.std(ddof=1), rel=1e-6)
        zero = np.isclose(groups.std(axis=1, ddof=1), 0).mean()
        assert done["frac_reward_zero_std"] == pytest.approx(zero)
        assert done["completions/mean_length"] == pytest.approx(np.mean([s["tokens"] for s in flat]))
        assert done["rewards/accuracy/mean"] == pytest.approx(np.mean([s["score"] for s in flat]))
        assert done["steps"] == STEPS and done["rows"] == M
        # the tables the round trained with: the round-start policy's and the reference's
        old = np.load(_round(work, r, "old_logps.npy"))
        ref = np.load(_round(work, r, "ref_logps.npy"))
        assert old.shape == ref.shape == (M, G, 64)  # the round's longest, rounded up to 64
        if r == 0:  # round 0 starts from the initial model: the same log-probs
            np.testing.assert_array_equal(old, ref)
        else:
            assert np.abs(old - ref).max() > 1e-4


def test_step_metrics_are_trls(run):
    work, _ = run
    rows = [m for m in run_compare.metrics_rows(work) if m["split"] == "train"]
    assert [m["step"] for m in rows] == list(range(1, R * STEPS + 1))
    for m in rows:
        for key in ("loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                    "clip_ratio/region_mean", "grad_norm"):
            assert np.isfinite(m[key]), key
        assert m["kl"] >= 0 and 0 <= m["clip_ratio/region_mean"] <= 1
    # the first step of round 0 is on-policy at the reference: no clip, no KL, and every
    # ratio is 1, so dapo's loss is minus the token-weighted mean advantage of the step's
    # completions, -sum_i A_i |o_i| / sum_i |o_i| (a per-completion mean would be 0 for
    # whole groups, whatever the advantages)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert rows[0]["clip_ratio/region_mean"] == 0.0
    seed = json.load(open(os.path.join(work, "config.json")))["seed"]
    scored = _jsonl(_round(work, 0, "rollouts.jsonl"))
    flat = [s["reward"] for p in scored for s in p["samples"]]
    adv = np.asarray(losses.group_advantages(np.asarray(flat), G, "group")).reshape(M, G)
    lengths = np.asarray([[len(s["ids"]) for s in p["samples"]] for p in scored])
    first = rollouts.batch_ids(M, B, seed, 0, 0)
    want = -(adv[first] * lengths[first]).sum() / lengths[first].sum()
    assert abs(want) > 1e-3  # a check that can fail
    np.testing.assert_allclose(rows[0]["loss"], want, rtol=1e-5, atol=1e-6)


def test_crash_mid_round_then_resume_equals_uninterrupted(run, tiny, tiny_config, questions,
                                                          tmp_path, monkeypatch):
    from mio_jax import periodic

    class Crash(Exception):
        pass

    save = periodic.Checkpoints.__call__

    def crash_after_step_4(self, step, state):  # round 1, after its first step
        save(self, step, state)
        if step == 4:
            self.checkpointer.wait()
            raise Crash()

    cfg = tiny_config(*tiny, **_overrides(questions))
    part = str(tmp_path / "part")
    monkeypatch.setattr(periodic.Checkpoints, "__call__", crash_after_step_4)
    with pytest.raises(Crash):
        online.train_and_evaluate(cfg, part)
    monkeypatch.undo()
    assert not os.path.exists(_round(part, 1, "done.json"))
    shutil.copytree(part, tmp_path / "switched")
    resumed = online.train_and_evaluate(cfg, part)
    work, whole = run
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
                 jax.device_get(whole["state"].params))
    for r in range(R):
        assert _jsonl(_round(part, r, "rollouts.jsonl")) == _jsonl(_round(work, r, "rollouts.jsonl"))
    # the same process and programs: the same numbers, not just close ones
    assert run_compare.metrics_rows(part) == run_compare.metrics_rows(work)
    # the round's stored tables serve another layout (a token sits at its unshared position
    # in every layout): resumed in the shared layout, the run ends as the uninterrupted one
    # up to float32 summation order
    switched = tiny_config(*tiny, **_overrides(questions, **{"data.shared_prompt": True}))
    online.train_and_evaluate(switched, str(tmp_path / "switched"))
    _assert_same_but_layout(run_compare.metrics_rows(str(tmp_path / "switched")),
                            run_compare.metrics_rows(work), run_compare.run_settings(work)[0],
                            since_step=4)


def test_crash_while_scoring_then_resume_equals_uninterrupted(run, tiny, tiny_config, questions,
                                                             tmp_path, monkeypatch):
    """Killed after round 1's samples are written but before its rewards are: the resumed
    round scores the stored samples and the run ends as the uninterrupted one."""
    class Crash(Exception):
        pass

    score = online.score_rollouts
    calls = []

    def crash_in_round_1(samples, funcs):
        calls.append(1)
        if len(calls) == 2:
            raise Crash()
        return score(samples, funcs)

    cfg = tiny_config(*tiny, **_overrides(questions))
    part = str(tmp_path / "part")
    monkeypatch.setattr(online, "score_rollouts", crash_in_round_1)
    with pytest.raises(Crash):
        online.train_and_evaluate(cfg, part)
    monkeypatch.undo()
    assert os.path.exists(_round(part, 1, "samples.jsonl"))
    assert not os.path.exists(_round(part, 1, "rollouts.jsonl"))
    resumed = online.train_and_evaluate(cfg, part)
    work, whole = run
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
                 jax.device_get(whole["state"].params))
    assert run_compare.metrics_rows(part) == run_compare.metrics_rows(work)


def test_lora_grpo_trains_the_adapters_with_the_base_as_reference(tiny, tiny_config, questions,
                                                                  tmp_path):
    over = _overrides(questions, **{"online.rounds": 1, "model.lora.enabled": True,
                                    "model.lora.rank": 4, "grpo.loss_type": "dapo",
                                    "grpo.epsilon_high": 0.28})
    out = online.train_and_evaluate(tiny_config(*tiny, **over), str(tmp_path / "lora"))
    assert out["step"] == STEPS
    assert set(out["state"].params) == {"layers"}  # adapters only
    ref = np.load(_round(str(tmp_path / "lora"), 0, "ref_logps.npy"))
    old = np.load(_round(str(tmp_path / "lora"), 0, "old_logps.npy"))
    # adapters start at zero (B = 0): the base and the round-start policy agree
    np.testing.assert_allclose(old, ref, atol=1e-6)
    assert np.isfinite(out["train"]["loss"])


def test_grpo_config_errors_name_the_key(tiny, tiny_config, questions, tmp_path):
    from mio_jax.errors import ConfigError

    for key, value, match in (("grpo.loss_type", "ppo", "grpo.loss_type"),
                              ("grpo.reward_funcs", "nope", "grpo.reward_funcs"),
                              ("grpo.scale_rewards", "std", "grpo.scale_rewards"),
                              ("data.packing", True, "data.packing")):
        with pytest.raises(ConfigError, match=match):
            train.train_and_evaluate(tiny_config(*tiny, **_overrides(questions, **{key: value})),
                                     str(tmp_path / "bad"))


def _assert_same_but_layout(shared_rows, rows, beta, since_step=0):
    """Metrics rows of a run whose steps after ``since_step`` trained in the shared-prompt
    layout equal an unshared run's within tests/tolerance.py, but for the tokens through
    the model (each prompt once per group)."""
    assert [(r["split"], r["step"]) for r in shared_rows] == [(r["split"], r["step"]) for r in rows]
    for x, y in zip(shared_rows, rows):
        x, y = dict(x), dict(y)
        if x["split"] == "train" and x["step"] > since_step:
            assert x.pop("num_tokens") < y.pop("num_tokens")
        tolerance.assert_rows_close(x, y, beta=beta, updates=y["step"] - (y["split"] == "train"),
                                    what=f"{y['split']} step {y['step']}")


def test_shared_prompt_round_equals_the_unshared_round(run, tiny, tiny_config, questions,
                                                       tmp_path):
    """The first round with every group in one shared-prompt row: the same samples and
    rewards, tables in the row layout's coordinates holding the same log-probs, and the
    same step metrics up to float32 summation order. (Both runs take R rounds, for the
    same learning-rate schedule; the second round's samples may differ: a hot sampler can
    turn a rounding-level change of the weights into another token.)"""
    work = str(tmp_path / "shared")
    out = online.train_and_evaluate(
        tiny_config(*tiny, **_overrides(questions, **{"data.shared_prompt": True})), work)
    single, _ = run
    assert out["step"] == R * STEPS
    for name in ("samples.jsonl", "rollouts.jsonl"):
        assert _jsonl(_round(work, 0, name)) == _jsonl(_round(single, 0, name)), name
    for name in ("old_logps.npy", "ref_logps.npy"):
        a, b = np.load(_round(work, 0, name)), np.load(_round(single, 0, name))
        n = min(a.shape[-1], b.shape[-1])
        assert a.shape[:2] == b.shape[:2] and not a[..., n:].any() and not b[..., n:].any()
        # token log-probs of the tiny model (|logp| <= TOKEN_SCALE) under another
        # summation order: one forward's rounding
        np.testing.assert_allclose(a[..., :n], b[..., :n], rtol=0,
                                   atol=tolerance.logp_atol(tolerance.TOKEN_SCALE, 1))
        assert np.abs(b).max() > 1.0  # real log-probs (some tokens are near-certain: ~0)
    rows = [r for r in run_compare.metrics_rows(single) if r["step"] <= STEPS]
    got = [r for r in run_compare.metrics_rows(work) if r["step"] <= STEPS]
    _assert_same_but_layout(got, rows, run_compare.run_settings(single)[0])


@pytest.mark.slow  # two JAX processes sharing the cores (about a minute on 2 cores)
def test_pod_of_two_processes_equals_one_process(run, tiny, questions, tmp_path, subprocess_env):
    """2 processes x 4 devices sample the same answers, score the same rewards and train to
    the same metrics as this process's 8 devices."""
    import sys

    from mio_jax import local_pod

    work = tmp_path / "pod"
    m, t, _ = tiny
    flags = {"model.path": m, "data.train_path": t, **_overrides(questions)}
    cmd = [sys.executable, "-m", "mio_jax.main", "--config=configs/tiny_test.py",
           f"--workdir={work}", *[f"--config.{k}={v}" for k, v in flags.items()]]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    local_pod.LocalPod(cmd, num_processes=2, devices_per_process=4, env=subprocess_env,
                       cwd=repo, log_dir=str(work) + "_logs").wait(600)
    single, _ = run
    for r in range(R):
        for name in ("samples.jsonl", "rollouts.jsonl"):
            assert _jsonl(_round(str(work), r, name)) == _jsonl(_round(single, r, name)), (r, name)
    run_compare.assert_same_run(str(work), single, weights=False)
