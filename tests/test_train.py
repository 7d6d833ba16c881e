"""The training loop: config validation, NaN guard, SIGKILL resume, SIGTERM checkpoint."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tolerance
from mio_jax import config as mio_config
from mio_jax import metrics, testing, train

BETA, LR = 0.1, 1e-3  # configs/tiny_test.py's loss.beta and optim.learning_rate

TIMING_KEYS = {"tokens_per_sec", "tokens_per_sec_per_device", "tflops_per_sec_per_device", "mfu"}


# ---- the config as the trainer reads it (the rules themselves: tests/test_config.py) ----

def test_loss_mix_weights_reach_the_step(tiny, tiny_config):
    cfg = tiny_config(*tiny, **{"loss.name": "dpo+sft",
                                                 "loss.weights": (0.8, 0.2)})
    mio_config.validate(cfg, num_devices=8)
    step_cfg = train.step_config(cfg)
    assert step_cfg.loss_name == ("dpo", "sft")
    assert step_cfg.loss_weights == (0.8, 0.2)


def test_flop_model_counts_tied_embedding_once():
    from flax import nnx

    from mio_jax import models

    for tied in (True, False):
        cfg = testing.tiny_model_config(tie_word_embeddings=tied)
        params = nnx.to_pure_dict(nnx.state(models.init_model(cfg), nnx.Param))
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        fm = metrics.flop_model(cfg)
        assert fm.matmul_params == (total if tied else total - 96 * 32)
        assert (fm.n_layers, fm.attn_dim) == (2, 32)


def test_flop_model_of_a_mixture_counts_the_active_experts():
    """Tiny Qwen3-MoE: 4 experts of [32 x 16] x 3 per layer, 2 a token: half of the
    experts' weights are active; everything else (router included) counts whole."""
    cfg = testing.tiny_moe_config()
    dense_part = metrics.flop_model(dataclasses.replace(cfg, num_experts_per_tok=4))
    active = metrics.flop_model(cfg)
    experts = 2 * 4 * 3 * 32 * 16  # layers x experts x (gate, up, down) x D x F
    assert dense_part.matmul_params - active.matmul_params == experts // 2


def test_flop_model_of_lora_counts_no_weight_gradient_for_the_frozen_base():
    import dataclasses

    from mio_jax.models import lora

    cfg = testing.tiny_model_config()
    spec = lora.make_spec(rank=4, alpha=8, target_modules="q_proj,down_proj", num_layers=2)
    fm, full = metrics.flop_model(dataclasses.replace(cfg, lora=spec)), metrics.flop_model(cfg)
    # q: A [2, 32, 4], B [2, 4, 4, 8]; down: A [2, 64, 4], B [2, 4, 32]
    assert fm.adapter_params == 2 * (32 * 4 + 4 * 32) + 2 * (64 * 4 + 4 * 32)
    assert fm.matmul_params == full.matmul_params
    attn = 6.0 * 2 * 32 * 16
    assert fm.train_flops_per_token(16) == 4.0 * fm.matmul_params + 6.0 * fm.adapter_params + attn
    assert full.train_flops_per_token(16) == 6.0 * full.matmul_params + attn


# ---- loop behaviour -----------------------------------------------------------------

def test_nan_loss_stops_with_step_and_batch_and_saves_nothing_broken(tiny, tmp_path, tiny_config):
    cfg = tiny_config(*tiny, **{
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
    """The ``python -m mio_jax.main`` command of the tiny config (run from the checkout)."""
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


def test_sigkill_then_resume_equals_uninterrupted_run(tiny, tmp_path, tiny_config, subprocess_env):
    steps = ["--config.train.steps=24", "--config.checkpoint.every_steps=2"]
    cfg = tiny_config(*tiny, **{"train.steps": 24, "checkpoint.every_steps": 2,
                                                 "eval.every_steps": 0})
    whole = train.train_and_evaluate(cfg, str(tmp_path / "whole"))
    work = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tiny, work, *steps), env=subprocess_env,
                            cwd=subprocess_env["PYTHONPATH"],
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


def test_sigterm_writes_a_checkpoint_and_exits_143(tiny, tmp_path, subprocess_env):
    work = tmp_path / "term"
    proc = subprocess.Popen(
        _cli(tiny, work, "--config.train.steps=100000", "--config.checkpoint.every_steps=100000",
             "--config.optim.warmup_steps=1"),
        env=subprocess_env, cwd=subprocess_env["PYTHONPATH"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = work / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    assert rc == 143, proc.stderr.read().decode()[-3000:]
    steps = [int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3


@pytest.mark.slow
@pytest.mark.rounding
def test_whole_run_on_mesh_2x2x2_equals_one_device(tiny, tmp_path, tiny_config):
    runs = {}
    for shape in ((2, 2, 2), (1, 1, 1)):
        cfg = tiny_config(*tiny, **{"mesh.shape": shape, "train.steps": 3,
                                                     "eval.every_steps": 0,
                                                     "checkpoint.export_hf": False})
        runs[shape] = train.train_and_evaluate(cfg, str(tmp_path / str(len(runs))))
    a, b = runs[(2, 2, 2)], runs[(1, 1, 1)]
    tolerance.assert_results_close(a, b, beta=BETA, learning_rate=LR, steps=3)


@pytest.fixture(scope="module")
def unshared_run(tiny, tmp_path_factory, tiny_config):
    """3 steps of the tiny config in the unshared [B, K, L] layout; eval at 0 and at the end."""
    cfg = tiny_config(*tiny, **{"train.steps": 3, "eval.every_steps": 0, "eval.at_start": True,
                                "checkpoint.export_hf": False})
    work = tmp_path_factory.mktemp("unshared")
    return train.train_and_evaluate(cfg, str(work)), work


def _eval_rows(workdir) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if r["split"] == "eval"}


@pytest.mark.rounding
def test_shared_prompt_run_equals_unshared_run(tiny, tmp_path, unshared_run, tiny_config):
    """data.shared_prompt computes each prompt once; the run's results stay the same."""
    cfg = tiny_config(*tiny, **{"data.shared_prompt": True, "train.steps": 3,
                                "eval.every_steps": 0, "checkpoint.export_hf": False})
    mio_config.validate(cfg, num_devices=8)
    a, b = train.train_and_evaluate(cfg, str(tmp_path)), unshared_run[0]
    tolerance.assert_results_close(a, b, beta=BETA, learning_rate=LR, steps=3, keys=(
        "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "grad_norm", "completion_tokens"))
    assert a["train"]["num_tokens"] < b["train"]["num_tokens"]  # each prompt ran once, not twice


@pytest.mark.rounding
def test_packed_run_evaluates_like_the_unshared_layout(tiny, tmp_path, unshared_run, tiny_config):
    """data.packing balances lengths across batches (other batches than the unshared run's),
    so the runs differ; evaluating the same initial weights over the whole eval split in
    packed rows (rounded to the 8 data-parallel devices) gives the unshared numbers."""
    cfg = tiny_config(*tiny, **{"data.packing": True, "train.steps": 3, "eval.every_steps": 0,
                                "eval.at_start": True, "checkpoint.export_hf": False})
    out = train.train_and_evaluate(cfg, str(tmp_path))
    packed, unshared = _eval_rows(tmp_path)[0], _eval_rows(unshared_run[1])[0]
    # the initial weights (policy = reference): rewards at rounding level, so the reward
    # accuracy is rounding's choice and is not compared (tests/tolerance.py)
    tolerance.assert_rows_close(packed, unshared, beta=BETA, updates=0, keys=(
        "loss", "rewards/accuracies", "logps/chosen", "logps/rejected", "num_groups",
        "completion_tokens"))
    assert packed["num_tokens"] == unshared["num_tokens"]  # no padding counted either way
    assert np.isfinite(out["train"]["loss"]) and out["train"]["loss"] != unshared["loss"]


@pytest.mark.rounding
def test_completion_logits_fraction_run_equals_full_projection_run(tiny, tmp_path, caplog, tiny_config):
    """model.completion_logits_fraction projects completion positions only; a batch that
    overflows the block falls back to the full projection. Either way the run is the same."""
    runs = {}
    for frac in (None, 0.9, 0.02):
        cfg = tiny_config(*tiny, **{"model.completion_logits_fraction": frac,
                                                     "train.steps": 3, "eval.every_steps": 0,
                                                     "checkpoint.export_hf": False})
        mio_config.validate(cfg, num_devices=8)
        caplog.clear()
        runs[frac] = train.train_and_evaluate(cfg, str(tmp_path / str(frac)))
        runs[frac]["fallbacks"] = sum("running the full output projection" in r.getMessage()
                                      for r in caplog.records)
    assert runs[None]["fallbacks"] == runs[0.9]["fallbacks"] == 0
    assert runs[0.02]["fallbacks"] == 3  # every batch overflows a 2% block
    base = runs[None]
    for frac in (0.9, 0.02):
        tolerance.assert_results_close(runs[frac], base, beta=BETA, learning_rate=LR, steps=3,
                                       keys=("loss", "logps/chosen", "logps/rejected",
                                             "rewards/margins", "grad_norm"))


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_reasoning_accuracy_is_logged_and_matches_the_exported_model(lora, tiny, tmp_path,
                                                                     tiny_config):
    """eval.reasoning_tasks: greedy held-out accuracy at each eval, same as mio_jax.evaluate
    on the exported model (with LoRA: generation with the adapters applied, the merged
    export, and the base + exported PEFT adapter all agree)."""
    from mio_jax import evaluate as evaluate_lib
    from mio_jax import heldout

    adapters = {"model.lora.enabled": True, "model.lora.rank": 4,
                "optim.learning_rate": 5e-2} if lora else {}
    cfg = tiny_config(*tiny, **adapters, **{
        "train.steps": 2, "eval.every_steps": 0, "eval.reasoning_tasks": "basic_arithmetic",
        "eval.reasoning_examples": 3, "eval.reasoning_max_new_tokens": 6})
    mio_config.validate(cfg, num_devices=8)
    work = tmp_path / "run"
    out = train.train_and_evaluate(cfg, str(work))
    saved = json.load(open(work / "reasoning_eval" / "step_2.json"))
    assert out["eval"]["reasoning/accuracy"] == saved["overall"]["accuracy"]
    assert out["eval"]["reasoning/basic_arithmetic/accuracy"] == \
        saved["tasks"]["basic_arithmetic"]["accuracy"]
    examples = heldout.heldout_examples("basic_arithmetic", 3, seed=0)
    assert [c["question"] for c in saved["completions"]] == [e["question"] for e in examples]
    sampler = evaluate_lib.make_sampler(out["export"], max_new_tokens=6)
    again = evaluate_lib.evaluate(sampler, examples, "reasoning_gym")
    assert [c["completions"] for c in saved["completions"]] == \
        [c["completions"] for c in again["completions"]]
    assert again["overall"]["accuracy"] == saved["overall"]["accuracy"]
    if lora:
        sampler = evaluate_lib.make_sampler(tiny[0], adapter=str(work / "peft_adapter"),
                                            max_new_tokens=6)
        applied = evaluate_lib.evaluate(sampler, examples, "reasoning_gym")
        assert [c["completions"] for c in applied["completions"]] == \
            [c["completions"] for c in saved["completions"]]


def test_probe_pairs_are_logged_at_every_eval(tiny, tmp_path, tiny_config):
    """``eval.probe_path`` pointing at the eval split's own file: the probe/* metrics of
    every eval row equal the eval split's (the same rows through the same evaluation),
    and the log-ratios are the rewards over beta."""
    cfg = tiny_config(*tiny, **{"eval.probe_path": tiny[2], "train.steps": 2,
                                "eval.every_steps": 0, "eval.at_start": True,
                                "reference.mode": "precomputed", "checkpoint.export_hf": False})
    out = train.train_and_evaluate(cfg, str(tmp_path))
    rows = _eval_rows(tmp_path)
    assert sorted(rows) == [0, 2]
    for row in rows.values():
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/chosen",
                    "rewards/margins", "num_groups"):
            assert row[f"probe/{key}"] == row[key], key
        for side in ("chosen", "rejected"):
            assert row[f"probe/logratio/{side}"] == pytest.approx(row[f"rewards/{side}"] / BETA,
                                                                  rel=1e-12)
    assert rows[2]["probe/logratio/chosen"] != 0.0  # it trained
    assert out["eval"]["probe/logps/chosen"] == rows[2]["logps/chosen"]
    assert os.path.isdir(tmp_path / "reference_cache")
