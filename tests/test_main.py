"""The command line: a tiny run end to end, and clear failures on bad input."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import trainer_fixtures  # noqa: E402

ROOT = trainer_fixtures.subprocess_env()["PYTHONPATH"]
EXPECTED_TRAIN_KEYS = {
    "loss", "loss/mio", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "logps/chosen", "logps/rejected", "mi/dv", "mi/js", "grad_norm",
    "param_norm", "update_norm", "learning_rate", "tokens_per_sec", "completion_tokens",
    "num_tokens", "mfu", "tflops_per_sec_per_device"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trainer_fixtures.tiny_setup(str(tmp_path_factory.mktemp("tiny_cli")))


def _main(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mio_jax.main", *args], cwd=ROOT,
                          env=trainer_fixtures.subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def _args(tiny, workdir, *extra):
    m, t, e = tiny
    return ["--config=configs/tiny_test.py", f"--workdir={workdir}", f"--config.model.path={m}",
            f"--config.data.train_path={t}", f"--config.data.eval_path={e}", *extra]


def test_cli_tiny_run_writes_everything(tiny, tmp_path):
    work = tmp_path / "run"
    r = _main(_args(tiny, work, "--config.train.steps=4", "--config.eval.every_steps=2",
                    "--config.eval.at_start=True", "--config.log.weight_norms=True",
                    "--config.loss.name=dpo", "--config.loss.beta=0.05"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "done:" in r.stdout
    assert "  name: dpo" in r.stderr and "  beta: 0.05" in r.stderr  # resolved config logged
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


def test_unknown_config_key_fails_naming_it(tiny, tmp_path):
    r = _main(_args(tiny, tmp_path, "--config.loss.bta=0.1"))
    assert r.returncode != 0 and "bta" in r.stderr


def test_bad_value_fails_naming_the_key(tiny, tmp_path):
    r = _main(_args(tiny, tmp_path, "--config.reference.mode=cached"))
    assert r.returncode == 2 and "reference.mode='cached'" in r.stderr


def test_missing_model_path_fails_clearly(tiny, tmp_path):
    r = _main(_args(tiny, tmp_path, f"--config.model.path={tmp_path}/nope"))
    assert r.returncode == 2 and f"model.path='{tmp_path}/nope' does not exist" in r.stderr


def test_unreadable_data_file_fails_naming_it(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": oops\n')
    r = _main(_args(tiny, tmp_path / "w", f"--config.data.train_path={bad}"))
    assert r.returncode == 2 and "bad.jsonl" in r.stderr
    missing = tmp_path / "missing.jsonl"
    r = _main(_args(tiny, tmp_path / "w2", f"--config.data.train_path={missing}"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
