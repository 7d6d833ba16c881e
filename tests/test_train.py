"""The training loop: config validation, NaN guard, SIGKILL resume, SIGTERM checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import trainer_fixtures  # noqa: E402

from mio_jax import config_validation, train  # noqa: E402

TIMING_KEYS = {"tokens_per_sec", "tokens_per_sec_per_device", "tflops_per_sec_per_device", "mfu"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trainer_fixtures.tiny_setup(str(tmp_path_factory.mktemp("tiny")))


# ---- config validation --------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ({"loss.name": "dpoo"}, "loss.name='dpoo' is not a registered loss"),
    ({"loss.beta": 0.0}, "loss.beta=0.0 must be > 0"),
    ({"loss.simpo_gamma": 0.3}, "loss.simpo_gamma=0.3 is set but loss.name='mio' does not use it"),
    ({"loss.name": "dpo", "reference.mode": "none"}, "needs a reference model"),
    ({"loss.name": "simpo"}, "is reference-free; set reference.mode='none'"),
    ({"reference.mode": "cached"}, "reference.mode='cached'"),
    ({"train.batch_size": 6}, "train.batch_size=6 / train.grad_accum_steps=1 = 6 groups per "
                              "micro-batch is not divisible by the data-parallel size 4"),
    ({"train.grad_accum_steps": 3}, "train.batch_size=8 is not divisible by train.grad_accum_steps=3"),
    ({"loss.name": "aot", "data.packing": True}, "data.packing=True cannot be used with loss.name='aot'"),
    ({"data.packing": True, "train.grad_accum_steps": 2}, "data.packing=True needs train.grad_accum_steps=1"),
    ({"data.packing": True, "loss.use_weighting": True}, "cannot be combined with loss.ld_alpha"),
    ({"optim.schedule": "step"}, "optim.schedule='step'"),
    ({"mesh.shape": (4, 4, 1)}, r"mesh.shape=\(4, 4, 1\) does not fit 8 devices"),
    ({"model.dtype": "float8"}, "model.dtype='float8'"),
    ({"model.attention": "flash"}, "model.attention='flash'"),
    ({"model.completion_logits_fraction": 1.5}, "model.completion_logits_fraction=1.5"),
    ({"model.attention": "cudnn"}, "model.attention='cudnn' needs model.dtype bfloat16"),
    ({"model.attention": "cudnn", "model.dtype": "bfloat16"}, "model.attention='cudnn' needs NVIDIA"),
    ({"data.on_bad_row": "ignore"}, "on_bad_row"),
    ({"data.shared_prompt": True, "data.packing": True}, "cannot be combined with data.packing"),
    ({"data.shared_prompt": True, "loss.ld_alpha": 0.5}, "shared_prompt=True cannot be combined"),
    ({"loss.weights": (1.0, 0.5)}, r"loss.weights=\(1.0, 0.5\) needs one weight per loss"),
    ({"loss.name": "dpo+sft", "loss.weights": (1.0, -1.0)}, "must be non-negative"),
])
def test_validation_names_the_key(tiny, override, message):
    cfg = trainer_fixtures.tiny_config(*tiny, **{"mesh.shape": (2, -1, 2), **override})
    with pytest.raises(config_validation.ConfigError, match=message):
        config_validation.validate(cfg, num_devices=8)


def test_loss_mix_weights_reach_the_step(tiny):
    cfg = trainer_fixtures.tiny_config(*tiny, **{"loss.name": "dpo+sft",
                                                 "loss.weights": (0.8, 0.2)})
    config_validation.validate(cfg, num_devices=8)
    step_cfg = train._step_config(cfg)
    assert step_cfg.loss_name == ("dpo", "sft")
    assert step_cfg.loss_weights == (0.8, 0.2)


def test_validation_rejects_unknown_keys_and_types(tiny):
    cfg = trainer_fixtures.tiny_config(*tiny)
    config_validation.validate(cfg, num_devices=8)  # the tiny config itself is valid
    with cfg.train.unlocked():
        cfg.train.stpes = 10
    with pytest.raises(config_validation.ConfigError, match="unknown config key 'train.stpes'"):
        config_validation.validate(cfg, num_devices=8)
    cfg = trainer_fixtures.tiny_config(*tiny)
    with cfg.train.unlocked():
        del cfg.train["steps"]
        cfg.train.steps = "ten"
    with pytest.raises(config_validation.ConfigError, match="'train.steps' = 'ten' has type str"):
        config_validation.validate(cfg, num_devices=8)


def test_shipped_configs_are_valid_and_dpo_beta_is_gradient_matched():
    from configs import default, dpo_default, paper

    mio, dpo = default.get_config(), dpo_default.get_config()
    config_validation.validate(mio, num_devices=1)
    config_validation.validate(dpo, num_devices=1)
    assert (mio.loss.name, dpo.loss.name) == ("mio", "dpo")
    assert dpo.loss.beta == mio.loss.beta / 2
    for arg, devices, backend in (("llama3_8b,mio,v5p-64", 32, "tpu"),
                                  ("qwen2.5_7b,dpo,h100x8", 8, "gpu"),
                                  ("mistral_7b,mio,v4-64", 32, "tpu")):
        config_validation.validate(paper.get_config(arg), num_devices=devices, backend=backend)
    with pytest.raises(config_validation.ConfigError, match="model.attention='cudnn' needs NVIDIA"):
        config_validation.validate(paper.get_config("qwen2.5_7b,dpo,h100x8"), num_devices=8)
    from configs import reproduce_small

    for method in reproduce_small.METHODS:
        config_validation.validate(reproduce_small.get_config(method), num_devices=1)


def test_flop_model_counts_tied_embedding_once():
    from flax import nnx

    from mio_jax import models

    for tied in (True, False):
        cfg = trainer_fixtures.tiny_model_config(tie_word_embeddings=tied)
        params = nnx.to_pure_dict(nnx.state(models.init_model(cfg), nnx.Param))
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        fm = train.flop_model(cfg, params)
        assert fm.matmul_params == (total if tied else total - 96 * 32)
        assert (fm.n_layers, fm.attn_dim) == (2, 32)


# ---- loop behaviour -----------------------------------------------------------------

def test_nan_loss_stops_with_step_and_batch_and_saves_nothing_broken(tiny, tmp_path):
    cfg = trainer_fixtures.tiny_config(*tiny, **{
        "optim.learning_rate": 1e15, "optim.warmup_steps": 0, "optim.schedule": "constant",
        "checkpoint.every_steps": 1, "eval.every_steps": 0, "train.steps": 5})
    with pytest.raises(FloatingPointError,
                       match=r"non-finite \[.*'loss'.*\] at step 2; batch indices \[\d+(, \d+){7}\]"):
        train.train_and_evaluate(cfg, str(tmp_path))
    # step 1 (finite) was saved; the broken step 2 was not
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def _rows(path):
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _cli(tiny, workdir, *extra):
    m, t, e = tiny
    return [sys.executable, "-m", "mio_jax.main", "--config=configs/tiny_test.py",
            f"--workdir={workdir}", f"--config.model.path={m}", f"--config.data.train_path={t}",
            f"--config.data.eval_path={e}", "--config.eval.every_steps=0", *extra]


def _wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): "
                                 f"{proc.stderr.read().decode()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sigkill_then_resume_equals_uninterrupted_run(tiny, tmp_path):
    steps = ["--config.train.steps=24", "--config.checkpoint.every_steps=2"]
    cfg = trainer_fixtures.tiny_config(*tiny, **{"train.steps": 24, "checkpoint.every_steps": 2,
                                                 "eval.every_steps": 0})
    whole = train.train_and_evaluate(cfg, str(tmp_path / "whole"))
    work = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tiny, work, *steps), env=trainer_fixtures.subprocess_env(),
                            cwd=trainer_fixtures.subprocess_env()["PYTHONPATH"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: os.path.isdir(work / "checkpoints" / "4"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(work / "hf_export"), "the run finished before it was killed"
    killed_at = max(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit())
    assert killed_at < 24
    resumed = train.train_and_evaluate(cfg, str(work))
    assert resumed["step"] == whole["step"] == 24
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
                 jax.device_get(whole["state"].params))
    # the metrics file reads exactly like the uninterrupted run's (rows written after the
    # checkpoint by the killed process are dropped on resume)
    a, b = _rows(work / "metrics.jsonl"), _rows(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in b if r["split"] == "train"] == list(range(1, 25))
    assert a == b
    assert resumed["eval"] == whole["eval"]


def test_sigterm_writes_a_checkpoint_and_exits_143(tiny, tmp_path):
    work = tmp_path / "term"
    proc = subprocess.Popen(
        _cli(tiny, work, "--config.train.steps=100000", "--config.checkpoint.every_steps=100000",
             "--config.optim.warmup_steps=1"),
        env=trainer_fixtures.subprocess_env(), cwd=trainer_fixtures.subprocess_env()["PYTHONPATH"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = work / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    assert rc == 143, proc.stderr.read().decode()[-3000:]
    steps = [int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3


@pytest.mark.slow
def test_whole_run_on_mesh_2x2x2_equals_one_device(tiny, tmp_path):
    runs = {}
    for shape in ((2, 2, 2), (1, 1, 1)):
        cfg = trainer_fixtures.tiny_config(*tiny, **{"mesh.shape": shape, "train.steps": 3,
                                                     "eval.every_steps": 0,
                                                     "checkpoint.export_hf": False})
        runs[shape] = train.train_and_evaluate(cfg, str(tmp_path / str(len(runs))))
    a, b = runs[(2, 2, 2)], runs[(1, 1, 1)]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5),
                 jax.device_get(a["state"].params), jax.device_get(b["state"].params))
    # rewards are beta * differences of log-probs of ~ -200: compare them absolutely
    for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert a["train"][k] == pytest.approx(b["train"][k], rel=2e-5, abs=2e-5), k
        if k in a["eval"]:
            assert a["eval"][k] == pytest.approx(b["eval"][k], rel=2e-5, abs=2e-5), k


def test_shared_prompt_run_equals_unshared_run(tiny, tmp_path):
    """data.shared_prompt computes each prompt once; the run's results stay the same."""
    runs = {}
    for shared in (False, True):
        cfg = trainer_fixtures.tiny_config(*tiny, **{"data.shared_prompt": shared,
                                                     "train.steps": 3, "eval.every_steps": 0,
                                                     "checkpoint.export_hf": False})
        config_validation.validate(cfg, num_devices=8)
        runs[shared] = train.train_and_evaluate(cfg, str(tmp_path / str(shared)))
    a, b = runs[True], runs[False]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5),
                 jax.device_get(a["state"].params), jax.device_get(b["state"].params))
    for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm",
              "completion_tokens"):
        assert a["train"][k] == pytest.approx(b["train"][k], rel=2e-5, abs=2e-5), k
    assert a["train"]["num_tokens"] < b["train"]["num_tokens"]  # each prompt ran once, not twice
    for k in ("loss", "rewards/accuracies", "logps/chosen"):
        assert a["eval"][k] == pytest.approx(b["eval"][k], rel=2e-5, abs=2e-5), k


def test_completion_logits_fraction_run_equals_full_projection_run(tiny, tmp_path, caplog):
    """model.completion_logits_fraction projects completion positions only; a batch that
    overflows the block falls back to the full projection. Either way the run is the same."""
    runs = {}
    for frac in (None, 0.9, 0.02):
        cfg = trainer_fixtures.tiny_config(*tiny, **{"model.completion_logits_fraction": frac,
                                                     "train.steps": 3, "eval.every_steps": 0,
                                                     "checkpoint.export_hf": False})
        config_validation.validate(cfg, num_devices=8)
        caplog.clear()
        runs[frac] = train.train_and_evaluate(cfg, str(tmp_path / str(frac)))
        runs[frac]["fallbacks"] = sum("running the full output projection" in r.getMessage()
                                      for r in caplog.records)
    assert runs[None]["fallbacks"] == runs[0.9]["fallbacks"] == 0
    assert runs[0.02]["fallbacks"] == 3  # every batch overflows a 2% block
    base = runs[None]
    for frac in (0.9, 0.02):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5),
                     jax.device_get(runs[frac]["state"].params), jax.device_get(base["state"].params))
        for k in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
            assert runs[frac]["train"][k] == pytest.approx(base["train"][k], rel=2e-5, abs=2e-5), k
        assert runs[frac]["eval"]["loss"] == pytest.approx(base["eval"]["loss"], rel=2e-5)


def test_reasoning_accuracy_is_logged_and_matches_the_exported_model(tiny, tmp_path):
    """eval.reasoning_tasks: greedy held-out accuracy at each eval, same as mio_jax.evaluate
    on the exported model."""
    from mio_jax import evaluate as evaluate_lib

    cfg = trainer_fixtures.tiny_config(*tiny, **{
        "train.steps": 2, "eval.every_steps": 0, "eval.reasoning_tasks": "basic_arithmetic",
        "eval.reasoning_examples": 3, "eval.reasoning_max_new_tokens": 6})
    config_validation.validate(cfg, num_devices=8)
    work = tmp_path / "run"
    out = train.train_and_evaluate(cfg, str(work))
    saved = json.load(open(work / "reasoning_eval" / "step_2.json"))
    assert out["eval"]["reasoning/accuracy"] == saved["overall"]["accuracy"]
    assert out["eval"]["reasoning/basic_arithmetic/accuracy"] == \
        saved["tasks"]["basic_arithmetic"]["accuracy"]
    examples = evaluate_lib.heldout_examples("basic_arithmetic", 3, seed=0)
    assert [c["question"] for c in saved["completions"]] == [e["question"] for e in examples]
    sampler = evaluate_lib.make_sampler(out["export"], max_new_tokens=6)
    again = evaluate_lib.evaluate(sampler, examples, "reasoning_gym")
    assert [c["completions"] for c in saved["completions"]] == \
        [c["completions"] for c in again["completions"]]
    assert again["overall"]["accuracy"] == saved["overall"]["accuracy"]


def test_unknown_reasoning_task_is_rejected(tiny):
    cfg = trainer_fixtures.tiny_config(*tiny, **{"eval.reasoning_tasks": "basic_arithmetic,nope"})
    with pytest.raises(config_validation.ConfigError, match="eval.reasoning_tasks: 'nope'"):
        config_validation.validate(cfg, num_devices=8)
