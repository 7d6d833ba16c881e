"""Online training (mio_jax.online): the rounds' data and metrics, and kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import run_compare

from mio_jax import config as mio_config
from mio_jax import online, testing, train
from mio_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M, K, S, R = 12, 4, 3, 2  # prompts per round, samples per prompt, steps per round, rounds


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("online") / "questions.jsonl"
    with open(path, "w") as f:
        for i in range(30):
            f.write(json.dumps({"question": f"q: {i}+{i % 7}=", "answer": str(i + i % 7)}) + "\n")
    return str(path)


def _overrides(questions, **extra):
    base = {"online.enabled": True, "online.rounds": R, "online.prompts_per_round": M,
            "online.samples_per_prompt": K, "online.steps_per_round": S, "online.tasks": "",
            "online.jsonl": questions, "online.verifier": "mio_jax.testing:parity_verifier",
            # a random tiny model with tied embeddings repeats its last token: sample hot
            "online.max_new_tokens": 8, "online.temperature": 8.0, "online.pairs": "all_pairs",
            "online.sample_batch_size": 32, "online.eval_every_rounds": 2,
            "online.system": "", "data.max_length": 64,
            "reference.mode": "precomputed", "data.eval_path": "", "eval.at_start": True,
            "eval.every_steps": 0, "eval.reasoning_tasks": "basic_arithmetic",
            "eval.reasoning_examples": 2, "eval.reasoning_max_new_tokens": 4,
            "checkpoint.every_steps": 2}
    base.update(extra)
    return base


def _read_jsonl(path):
    return [json.loads(line) for line in open(path)]


_rows = run_compare.metrics_rows


def _round(workdir, r, name):
    return os.path.join(workdir, "online", f"round_{r:04d}", name)


def _same_runs(a, b):
    """Two online workdirs agree: every round's samples and rows exactly, the metrics rows
    (timing aside) and the exported weights closely (`run_compare`)."""
    def rows(path):  # the verifier's name aside (the killed runs name the killing twin)
        return [{k: v for k, v in x.items() if k != "verifier"} for x in _read_jsonl(path)]

    for r in range(R):
        for name in ("prompts.jsonl", "samples.jsonl", "pairs.jsonl"):
            assert rows(_round(a, r, name)) == rows(_round(b, r, name)), (r, name)
    run_compare.assert_same_run(a, b)


# ---- pure pieces ------------------------------------------------------------------------

def _samples(scores_per_prompt):
    out = []
    for i, scores in enumerate(scores_per_prompt):
        out.append({"index": i, "example": {"question": f"q{i}", "answer": "1"},
                    "prompt": [{"role": "user", "content": f"q{i}"}],
                    "samples": [{"text": f"a{i}_{j}", "score": s, "tokens": 3 + j,
                                 "finish": "eos" if j else "length"}
                                for j, s in enumerate(scores)]})
    return out


def test_round_rows_and_stats_follow_the_rules():
    samples = _samples([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0.5, 1, 0], [1, 0]])
    samples[-1]["samples"][1]["text"] = " \n"  # blank: scored, never paired
    assert online.round_stats(samples)["blank_answers"] == 1
    samples = samples[:-1]
    stats = online.round_stats(samples)
    assert stats["pass_rate"] == pytest.approx(7 / 16)  # 0.5 is not correct
    assert stats["signal_fraction"] == pytest.approx(0.5)
    assert (stats["all_correct"], stats["none_correct"]) == (1, 1)
    assert stats["answer_tokens_mean"] == pytest.approx(4.5)
    assert stats["truncated_fraction"] == pytest.approx(0.25)
    best = online.round_rows(samples, "best_worst")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in best] == [
        ("a0_0", "a0_1"), ("a3_2", "a3_0")]  # the worst: score 0 before 0.5, first of equals
    every = online.round_rows(samples, "all_pairs")
    assert len(every) == 2 * 2 + 1 * 3  # correct x incorrect of each prompt with signal
    group = online.round_rows(samples, "group")
    assert [len(r["completions"]) for r in group] == [3, 4]
    assert [r["scores"][0] for r in group] == [1.0, 1.0]


def test_a_damaged_round_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"prompt": 1}\n\n{"prompt": 2\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:3: not valid JSON.*move the round "
                                         r"folder aside"):
        online._read_jsonl(str(path))
    path.write_text('{"prompt": 1}\n{"prompt": 2}\n')
    assert online._read_jsonl(str(path)) == [{"prompt": 1}, {"prompt": 2}]


def test_round_examples_cycle_the_jsonl(questions):
    c = mio_config.base_config()
    c.online.tasks, c.online.jsonl, c.online.prompts_per_round = "", questions, 12
    rows = [json.loads(line) for line in open(questions)]
    r2 = online.round_examples(c, 2, rows)
    assert [ex["question"] for ex, _ in r2] == [rows[(24 + i) % 30]["question"] for i in range(12)]
    assert {v for _, v in r2} == {"exact_number"}


@pytest.mark.parametrize("key,value,needle", [
    ("online.samples_per_prompt", 1, "online.samples_per_prompt"),
    ("online.pairs", "best", "online.pairs"),
    ("online.reference", "base", "online.reference"),
    ("reference.mode", "frozen", "reference.mode"),
    ("online.verifier", "nope", "online.verifier"),
    ("online.prompts_per_round", 1, "train.batch_size"),
    ("online.jsonl", "/no/such.jsonl", "online.jsonl"),
])
def test_bad_online_configs_name_the_key(key, value, needle, tiny, tiny_config, questions):
    c = tiny_config(*tiny, **_overrides(questions, **{key: value}))
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        mio_config.validate(c, num_devices=8)


# ---- a tiny online run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tiny, tiny_config, questions, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("online_run") / "run")
    out = online.train_and_evaluate(tiny_config(*tiny, **_overrides(questions)), work)
    return work, out


def test_tiny_online_run_writes_checked_round_data(uninterrupted, questions):
    work, out = uninterrupted
    rows_q = [json.loads(line) for line in open(questions)]
    dones = [json.load(open(_round(work, r, "done.json"))) for r in range(R)]
    assert out["step"] == sum(d["steps"] for d in dones) == R * S
    metrics = _rows(work)
    for r, done in enumerate(dones):
        prompts = _read_jsonl(_round(work, r, "prompts.jsonl"))
        assert [p["question"] for p in prompts] == [rows_q[(r * M + i) % 30]["question"]
                                                    for i in range(M)]
        samples = _read_jsonl(_round(work, r, "samples.jsonl"))
        assert [len(p["samples"]) for p in samples] == [K] * M
        scores = [[s["score"] for s in p["samples"]] for p in samples]
        for p in samples:  # the verifier's verdicts, as written
            assert [s["score"] for s in p["samples"]] == [
                testing.parity_verifier(s["text"], None) for s in p["samples"]]
        assert done["pass_rate"] == pytest.approx(np.mean(scores))
        good = [int(sum(s)) for s in scores]
        assert done["all_correct"] == sum(g == K for g in good)
        assert done["none_correct"] == sum(g == 0 for g in good)
        pairs = _read_jsonl(_round(work, r, "pairs.jsonl"))
        assert len(pairs) == done["rows"] > 0
        assert all(len(p["chosen"][0]["content"]) % 2 == 0 for p in pairs)
        assert all(len(p["rejected"][0]["content"]) % 2 == 1 for p in pairs)
        assert done["steps"] == S and done["end_step"] == (r + 1) * S
        assert np.isfinite(done["logps_chosen"]) and done["logps_chosen"] < 0
        row = next(m for m in metrics if m["split"] == "round" and m["round"] == r)
        assert row["step"] == done["end_step"]
        for k in ("pass_rate", "signal_fraction", "rows", "chosen_logratio", "logps_chosen"):
            assert row[k] == pytest.approx(done[k])
    # round 0 trains from the reference itself: its steps move its pairs' margin up (later
    # rounds' log-ratios are against the initial model, after other rounds' rows)
    assert dones[0]["chosen_logratio"] - dones[0]["rejected_logratio"] > 0
    # samples come from the policy being trained: later rounds' answers differ in kind
    assert _read_jsonl(_round(work, 0, "samples.jsonl")) != _read_jsonl(_round(work, 1, "samples.jsonl"))
    assert [m["step"] for m in metrics if m["split"] == "train"] == list(range(1, R * S + 1))
    evals = [m for m in metrics if m["split"] == "eval"]
    assert [m["step"] for m in evals] == [0, 2 * S]  # at the start and after round 2 (the last)
    assert all(m["reasoning/ci95_low"] <= m["reasoning/accuracy"] <= m["reasoning/ci95_high"]
               for m in evals)
    assert dones[1]["eval"] and not dones[0]["eval"]
    assert os.path.isfile(os.path.join(work, "reasoning_eval", f"step_{2 * S}.json"))


def test_round_zero_reference_previous_equals_initial(tiny, tiny_config, questions, tmp_path):
    """Round 0's reference is the initial model either way: the same first round."""
    over = _overrides(questions, **{"online.rounds": 1, "online.reference": "previous",
                                    "eval.reasoning_tasks": "", "checkpoint.export_hf": False})
    a = online.train_and_evaluate(tiny_config(*tiny, **over), str(tmp_path / "prev"))
    over["online.reference"] = "initial"
    b = online.train_and_evaluate(tiny_config(*tiny, **over), str(tmp_path / "init"))
    assert a["rounds"][0]["chosen_logratio"] == pytest.approx(b["rounds"][0]["chosen_logratio"],
                                                              rel=1e-5)
    assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-5)


# ---- kill and resume --------------------------------------------------------------------

def _command(tiny, work, overrides):
    m, t, e = tiny
    flags = {"model.path": m, "data.train_path": t, **overrides}
    return [sys.executable, "-m", "mio_jax.main", "--config=configs/tiny_test.py",
            f"--workdir={work}", *[f"--config.{k}={v}" for k, v in flags.items()]]


def test_kill_while_sampling_resumes_the_same_round(tiny, questions, uninterrupted, tmp_path,
                                                    subprocess_env):
    """SIGKILL while round 1's samples are being verified: the round samples again from the
    checkpoint at its start, and the run ends as the uninterrupted one."""
    work = tmp_path / "killed"
    over = _overrides(questions, **{"online.verifier": "mio_jax.testing:killing_verifier"})
    kill_file = tmp_path / "kill"
    kill_file.write_text(str(M * K + 5))  # the 5th verdict of round 1
    env = dict(subprocess_env, **{testing.KILL_FILE: str(kill_file)})
    first = subprocess.run(_command(tiny, work, over), env=env, capture_output=True, text=True,
                           timeout=600, cwd=REPO)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert os.path.exists(_round(work, 0, "done.json"))
    assert not os.path.exists(_round(work, 1, "samples.jsonl"))
    second = subprocess.run(_command(tiny, work, over), env=env, capture_output=True,
                            text=True, timeout=600, cwd=REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    _same_runs(str(work), uninterrupted[0])


def test_kill_while_training_resumes_from_the_round_checkpoint(tiny, questions, uninterrupted,
                                                               tmp_path, subprocess_env):
    """SIGKILL once round 1 is training: the resumed run reads the round's files, restores
    the checkpoint inside the round with its data position, and ends as uninterrupted."""
    work = tmp_path / "killed"
    over = _overrides(questions)
    proc = subprocess.Popen(_command(tiny, work, over), env=subprocess_env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = work / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(x).get("split") == "train"
                                    and json.loads(x)["step"] == S + 1
                                    for x in metrics.read_text().splitlines() if x.strip()):
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not os.path.exists(_round(work, R - 1, "done.json"))  # killed before the end
    second = subprocess.run(_command(tiny, work, over), env=subprocess_env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    _same_runs(str(work), uninterrupted[0])


def test_plot_rounds_draws_each_runs_round_panels(uninterrupted, tmp_path):
    from mio_jax import plot

    work, _ = uninterrupted
    dones = [json.load(open(_round(work, r, "done.json"))) for r in range(R)]
    fig = plot.plot_rounds([work, work], labels=["a", "b"])
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert {"pass_rate", "signal_fraction", "chosen_logratio", "logps_chosen",
            "held-out accuracy (95% CI)"} <= set(axes)
    x, y = axes["pass_rate"].lines[0].get_data()
    assert list(x) == list(range(R))
    np.testing.assert_allclose(y, [d["pass_rate"] for d in dones], rtol=1e-6)
    assert len(axes["pass_rate"].lines) == 2  # one line per run
    held = axes["held-out accuracy (95% CI)"]
    assert list(held.lines[0].get_xdata()) == [-1, 1]  # before round 0, after round 1
    plot.main(["--rounds", work, f"--out={tmp_path / 'rounds.png'}"])
    assert (tmp_path / "rounds.png").stat().st_size > 0


def test_study_report_tables_come_from_the_runs_files(uninterrupted, tmp_path):
    # scripts/online_report.py on two copies of the tiny run, the second without its own
    # start eval (the study's later runs skip it and take the shared base_eval.json).
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location(
        "online_report", os.path.join(REPO, "scripts", "online_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    work, _ = uninterrupted
    runs = tmp_path / "runs"
    for name in ("mio_seed0", "dpo_seed1"):
        shutil.copytree(work, runs / name, ignore=shutil.ignore_patterns("checkpoints"))
    os.remove(runs / "dpo_seed1" / "reasoning_eval" / "step_0.json")
    shutil.copy(runs / "mio_seed0" / "reasoning_eval" / "step_0.json", runs / "base_eval.json")
    (runs / "wall_times.tsv").write_text("mio_seed0\t12\ndpo_seed1\t34\n")
    out = tmp_path / "out"
    report.main([f"--runs={runs}", f"--out={out}"])
    text = (out / "results.md").read_text()
    base = json.load(open(runs / "base_eval.json"))["overall"]
    last = json.load(open(os.path.join(work, "reasoning_eval", f"step_{R * S}.json")))["overall"]
    dones = [json.load(open(_round(work, r, "done.json"))) for r in range(R)]
    row = next(line for line in text.splitlines() if line.startswith("| dpo_seed1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith(f"{base['accuracy']:.3f} ({base['correct']}/{base['n']})")
    assert cells[4].startswith(f"{last['accuracy']:.3f} ({last['correct']}/{last['n']})")
    assert cells[5] == f"{dones[0]['pass_rate']:.3f} -> {dones[-1]['pass_rate']:.3f}"
    assert cells[8] == str(sum(d["rows"] for d in dones)) and cells[9] == "34"
    pooled = next(line for line in text.splitlines() if line.startswith("| dpo |"))
    assert f"({last['correct']}/{last['n']})" in pooled
    assert "Total wall time of the runs on this machine: 46 s." in text
    assert (out / "rounds.png").stat().st_size > 0 and (out / "methods.png").stat().st_size > 0
    assert (out / "eval" / "base.json").is_file()
    assert json.load(open(out / "rounds" / "mio_seed0.json")) == dones
    import gzip

    pairs = [json.loads(line) for line in gzip.open(out / "pairs" / "dpo_seed1.jsonl.gz", "rt")]
    assert [sum(p["round"] == r for p in pairs) for r in range(R)] == [d["rows"] for d in dones]
    samples = [json.loads(line) for line in gzip.open(out / "samples" / "mio_seed0.jsonl.gz", "rt")]
    assert [{k: v for k, v in x.items() if k != "round"} for x in samples if x["round"] == 1] \
        == _read_jsonl(_round(work, 1, "samples.jsonl"))


def test_pod_of_two_processes_equals_one_process(tiny, questions, uninterrupted, tmp_path,
                                                 subprocess_env):
    """2 processes x 4 devices sample the same answers, write the same rounds and train to
    the same weights as this process's 8 devices."""
    from mio_jax import local_pod

    work = tmp_path / "pod"
    local_pod.LocalPod(_command(tiny, work, _overrides(questions)), num_processes=2,
                       devices_per_process=4, env=subprocess_env, cwd=REPO,
                       log_dir=str(work) + "_logs").wait(600)
    _same_runs(str(work), uninterrupted[0])


# "previous" is -m slow: a LoRA round's reference in the base view is the "initial" case,
# and "previous" with full weights is test_round_zero_reference_previous_equals_initial's
@pytest.mark.parametrize("reference", ["initial",
                                       pytest.param("previous", marks=pytest.mark.slow)])
def test_online_lora_trains_the_adapters_with_the_base_as_reference(reference, tiny, tiny_config,
                                                                    questions, tmp_path):
    over = _overrides(questions, **{"online.rounds": 2, "online.reference": reference,
                                    "model.lora.enabled": True, "model.lora.rank": 4,
                                    "eval.reasoning_tasks": ""})
    out = online.train_and_evaluate(tiny_config(*tiny, **over), str(tmp_path / "lora"))
    assert out["step"] == 2 * S
    assert set(out["state"].params) == {"layers"}  # adapters only
    assert all("lora" in k for k in out["state"].params["layers"])
    for r in range(2):
        done = json.load(open(_round(str(tmp_path / "lora"), r, "done.json")))
        assert done["rows"] > 0 and np.isfinite(done["chosen_logratio"])
    assert os.path.isfile(tmp_path / "lora" / "peft_adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("rule,loss,extra", [
    ("best_worst", "dpo", {}),
    pytest.param("best_worst", "rpo", {"loss.rpo_alpha": 1.0}, marks=pytest.mark.slow),
    ("group", "js_multi", {"data.kway_mode": "group", "data.num_negatives": 3}),
    pytest.param("group", "infonce", {"data.kway_mode": "group", "data.num_negatives": 3},
                 marks=pytest.mark.slow)])
def test_every_pair_rule_trains_with_its_losses(rule, loss, extra, tiny, tiny_config, questions,
                                                tmp_path):
    over = _overrides(questions, **{"online.rounds": 1, "online.pairs": rule, "loss.name": loss,
                                    "eval.reasoning_tasks": "", "checkpoint.export_hf": False,
                                    "online.prompts_per_round": 24, **extra})
    out = online.train_and_evaluate(tiny_config(*tiny, **over), str(tmp_path / "run"))
    rows = _read_jsonl(_round(str(tmp_path / "run"), 0, "pairs.jsonl"))
    samples = _read_jsonl(_round(str(tmp_path / "run"), 0, "samples.jsonl"))
    signal = sum(0 < sum(s["score"] for s in p["samples"]) < K for p in samples)
    assert len(rows) == signal  # one row per prompt with signal
    key = "completions" if rule == "group" else "chosen"
    assert all(key in r for r in rows)
    assert out["step"] == S and np.isfinite(out["train"]["loss"])
