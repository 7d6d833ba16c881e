"""The command line: a tiny run end to end, and clear failures on bad input."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_TRAIN_KEYS = {
    "loss", "loss/mio", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "mi/dv", "mi/js", "grad_norm",
    "param_norm", "update_norm", "learning_rate", "tokens_per_sec", "completion_tokens",
    "num_tokens", "mfu", "tflops_per_sec_per_device"}


@pytest.fixture
def run_main(subprocess_env):
    def run(args, timeout=300, cwd=ROOT, checkout_on_path=True):
        env = dict(subprocess_env)
        if not checkout_on_path:  # as for a user's own folder: `configs` is not importable
            env.pop("PYTHONPATH", None)
        return subprocess.run([sys.executable, "-m", "mio_jax.main", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return run


def _args(tiny, workdir, *extra):
    m, t, e = tiny
    return ["--config=configs/tiny_test.py", f"--workdir={workdir}", f"--config.model.path={m}",
            f"--config.data.train_path={t}", f"--config.data.eval_path={e}", *extra]


def _one_line_error(r, *needles):
    """Exit status 2, the reason on one ``error:`` line naming ``needles``, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_cli_tiny_run_writes_everything(tiny, tmp_path, run_main):
    work = tmp_path / "run"
    r = run_main(_args(tiny, work, "--config.train.steps=4", "--config.eval.every_steps=2",
                    "--config.eval.at_start=True", "--config.log.weight_norms=True",
                    "--config.loss.name=dpo", "--config.loss.beta=0.05"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "done:" in r.stdout
    assert "  name: dpo" in r.stderr and "  beta: 0.05" in r.stderr  # resolved config logged
    # ... with the effective value of each hyper-parameter dpo reads (its defaults)
    assert "  label_smoothing: 0.0" in r.stderr and "  f_divergence_type: reverse_kl" in r.stderr
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]
    rows = [json.loads(x) for x in open(work / "metrics.jsonl")]
    train_rows = [x for x in rows if x["split"] == "train"]
    assert [x["step"] for x in train_rows] == [1, 2, 3, 4]
    want = {k.replace("/mio", "/dpo") for k in EXPECTED_TRAIN_KEYS}
    assert want <= set(train_rows[-1]), want - set(train_rows[-1])
    evals = [x for x in rows if x["split"] == "eval"]
    assert [x["step"] for x in evals] == [0, 2, 4]
    assert evals[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # DPO at z = 0: ln 2
    assert {"loss", "rewards/accuracies", "rewards/margins"} <= set(evals[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(work / "tb"))
    saved = json.load(open(work / "checkpoints" / "4" / "config" / "metadata"))
    assert saved["loss"]["name"] == "dpo" and saved["train"]["steps"] == 4
    assert json.load(open(work / "config.json")) == saved  # the run's config, beside its outputs
    assert (saved["loss"]["label_smoothing"], saved["loss"]["f_divergence_type"],
            saved["loss"]["f_alpha_divergence_coef"]) == (0.0, "reverse_kl", 0.5)
    assert saved["loss"]["simpo_gamma"] is None  # not a hyper-parameter of dpo

    # the exported folder loads with the models API and gives finite logits
    import jax.numpy as jnp
    import numpy as np

    from mio_jax import models

    model = models.load_pretrained(str(work / "hf_export"))
    tok = models.load_tokenizer(str(work / "hf_export"))
    ids = jnp.asarray([tok("q: 1+2= 3.")["input_ids"]])
    assert np.isfinite(np.asarray(model(ids))).all()

    # `python -m mio_jax.convert` exports a checkpoint: the newest equals the final export
    from safetensors.numpy import load_file

    from mio_jax import convert

    final = load_file(str(work / "hf_export" / "model.safetensors"))
    assert convert.main([str(work), str(tmp_path / "from_ckpt")]) == 0
    assert convert.main([str(work / "checkpoints" / "2"), str(tmp_path / "step2")]) == 0
    newest = load_file(str(tmp_path / "from_ckpt" / "model.safetensors"))
    step2 = load_file(str(tmp_path / "step2" / "model.safetensors"))
    assert sorted(newest) == sorted(final) == sorted(step2)
    for name in final:
        np.testing.assert_array_equal(newest[name], final[name], err_msg=name)
    assert any(not np.array_equal(step2[n], final[n]) for n in final)  # step 2 is another state
    assert models.load_tokenizer(str(tmp_path / "from_ckpt"))("q: 1+2=")["input_ids"] == \
        tok("q: 1+2=")["input_ids"]


def test_unknown_config_key_fails_naming_it(tiny, tmp_path, run_main):
    _one_line_error(run_main(_args(tiny, tmp_path, "--config.loss.bta=0.1")),
                    "unknown config key 'loss.bta'")


def test_bad_value_fails_naming_the_key(tiny, tmp_path, run_main):
    _one_line_error(run_main(_args(tiny, tmp_path, "--config.reference.mode=cached")),
                    "reference.mode='cached'")


def test_missing_model_path_fails_clearly(tiny, tmp_path, run_main):
    r = run_main(_args(tiny, tmp_path, f"--config.model.path={tmp_path}/nope"))
    _one_line_error(r, f"model.path='{tmp_path}/nope' does not exist")


def test_unreadable_data_file_fails_naming_it(tiny, tmp_path, run_main):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": oops\n')
    _one_line_error(run_main(_args(tiny, tmp_path / "w", f"--config.data.train_path={bad}")),
                    "bad.jsonl:2")
    missing = tmp_path / "missing.jsonl"
    _one_line_error(run_main(_args(tiny, tmp_path / "w2",
                                   f"--config.data.train_path={missing}")), "missing.jsonl")


def test_evaluate_with_a_broken_adapter_folder_fails_in_one_line(tiny, tmp_path,
                                                                 subprocess_env):
    (tmp_path / "adapter").mkdir()  # a PEFT folder without adapter_config.json
    r = subprocess.run([sys.executable, "-m", "mio_jax.evaluate", f"--model={tiny[0]}",
                        f"--adapter={tmp_path}/adapter", "--task=chain_sum",
                        "--num_examples=1", f"--out={tmp_path}/e.json"],
                       cwd=ROOT, env=subprocess_env, capture_output=True, text=True,
                       timeout=300)
    _one_line_error(r, str(tmp_path / "adapter"))


@pytest.mark.parametrize("body,needles", [
    # an experiment file of the old layout, run outside the checkout
    ("from configs import common\n\n\ndef get_config(arg=None):\n    return common.base_config()\n",
     ["exp.py, line 1: ModuleNotFoundError: No module named 'configs'"]),
    ("X = 1\n", ["exp.py has no get_config(arg=None) function"]),
    ("def get_config(arg=None):\n    raise ValueError('no such arm: ' + str(arg))\n",
     ["exp.py, line 2: ValueError: no such arm: big"]),
])
def test_experiment_file_that_does_not_load_fails_in_one_line(tmp_path, run_main, body, needles):
    (tmp_path / "exp.py").write_text(body)
    _one_line_error(run_main(["--config=exp.py:big", f"--workdir={tmp_path}/w",
                              "--config.train.steps=2"], cwd=tmp_path, checkout_on_path=False),
                    *needles)


def test_missing_experiment_file_fails_in_one_line(tmp_path, run_main):
    _one_line_error(run_main(["--config=nope.py", f"--workdir={tmp_path}/w"], cwd=tmp_path),
                    "experiment file 'nope.py' not found")
