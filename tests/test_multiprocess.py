"""Several JAX processes == one process: a pod rehearsed on this machine.

Each test starts N processes of ``python -m mio_jax.main`` on 127.0.0.1 (``mio_jax.local_pod``:
a free port, the launchers' environment contract, D CPU devices each, a time limit, every
process killed and every log shown when one fails) and compares what they wrote with one
process holding N x D devices (this test process, 8 devices): every train and eval metric
row, and every exported weight.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import run_compare
from mio_jax import local_pod, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_TIMEOUT = 300


def _flag(value) -> str:
    return repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


def _command(files, workdir, overrides: dict) -> list[str]:
    m, t, e = files
    base = {"model.path": m, "data.train_path": t, "data.eval_path": e, **overrides}
    return [sys.executable, "-m", "mio_jax.main", "--config=configs/tiny_test.py",
            f"--workdir={workdir}", *[f"--config.{k}={_flag(v)}" for k, v in base.items()]]


def _pod(files, workdir, overrides, *, n, d, env):
    return local_pod.LocalPod(_command(files, workdir, overrides), num_processes=n,
                              devices_per_process=d, env=env, cwd=ROOT,
                              log_dir=os.path.join(str(workdir) + "_logs"))


def _run_pod(files, workdir, overrides, *, n, d, env):
    return _pod(files, workdir, overrides, n=n, d=d, env=env).wait(POD_TIMEOUT)


def _one_process(files, workdir, overrides, tiny_config):
    return train.train_and_evaluate(tiny_config(*files, **overrides), str(workdir))


def _same_run(pod_dir, ref_dir, **kw) -> dict:
    """Asserts metrics.jsonl and hf_export agree; returns the largest differences."""
    out = run_compare.assert_same_run(pod_dir, ref_dir, **kw)
    print(f"{pod_dir}: {out}")
    return out


def _manifests(workdir) -> dict:
    """split -> the manifest of the run's tokenized cache folder of that split."""
    root = os.path.join(workdir, "data_cache")
    return {name.split("-")[0]: json.load(open(os.path.join(root, name, "manifest.json")))
            for name in sorted(os.listdir(root))}


def _same_cache(pod_dir, ref_dir, n: int) -> None:
    """The pod built its tokenized cache in n parts, each process tokenising 1/n of the
    rows, and the combined summary equals the one process's single part."""
    pod, one = _manifests(pod_dir), _manifests(ref_dir)
    assert pod.keys() == one.keys() == {"train", "eval"}
    for split in pod:
        assert pod[split]["fingerprint"] == one[split]["fingerprint"]
        assert pod[split]["summary"] == one[split]["summary"]
        assert len(pod[split]["parts"]) == n and len(one[split]["parts"]) == 1
        rows = [s["counts"]["rows_read"] for s in pod[split]["stats"]]
        total = one[split]["summary"]["rows_read"]
        assert sum(rows) == total and max(rows) - min(rows) <= 1, rows


@pytest.fixture(scope="module")
def kway_files(tiny, tmp_path_factory):
    """The tiny model with K-way rows (a prompt, 3 scored completions) for K = 3 groups."""
    rng = np.random.default_rng(7)
    path = str(tmp_path_factory.mktemp("kway") / "kway.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(48):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            wrong = [a + b + int(x) for x in rng.integers(1, 9, 2)]
            f.write(json.dumps({"prompt": f"q: {a}+{b}=", "completions": [
                f" {a + b}.", f" {wrong[0]}.", f" {wrong[1]} so."], "scores": [3, 1, 0]}) + "\n")
    return tiny[0], path, path


FEATURES = {
    # frozen reference; shared prompt rows, completion-only projection, bucketing; shuffled
    "shared_bucketed_frozen": (2, 4, {
        "data.shared_prompt": True, "model.completion_logits_fraction": 0.9,
        "data.bucketing": True, "data.pad_to_multiple_of": 8}),
    # the same with held-out reasoning accuracy by greedy generation at each eval
    "shared_bucketed_frozen_reasoning": (2, 4, {
        "data.shared_prompt": True, "model.completion_logits_fraction": 0.9,
        "data.bucketing": True, "data.pad_to_multiple_of": 8,
        "eval.reasoning_tasks": "basic_arithmetic", "eval.reasoning_examples": 2,
        "eval.reasoning_max_new_tokens": 4}),
    # precomputed reference with shuffled batches; packed rows
    "packed_precomputed_shuffled": (4, 2, {"data.packing": True, "reference.mode": "precomputed"}),
    # no reference (SimPO), unshuffled, gradient accumulation; tensor parallelism over 2
    "accumulated_reference_free_tensor2": (4, 2, {
        "loss.name": "simpo", "loss.beta": 2.0, "reference.mode": "none", "data.shuffle": False,
        "train.grad_accum_steps": 2, "mesh.shape": (1, 4, 2)}),
    # QLoRA: an NF4 base sharded over fsdp x tensor, adapters with dropout, the base as the
    # reference; the export merges the adapters (every process gathers base and adapters)
    "qlora_nf4_dropout_tensor2": (2, 4, {
        "model.lora.enabled": True, "model.lora.rank": 4, "model.lora.quantize": "nf4",
        "model.lora.dropout": 0.1, "mesh.shape": (1, 4, 2)}),
}


# These pods (35-90 s each on 2 cores) run with -m slow. The default suite's pods: the
# torn-shard test below (the tokenized cache built in parts, a frozen reference, equal to
# one process), the preemption test (SIGTERM, elastic resume, convert) and the online pod
# (tests/test_online.py: the precomputed reference's cross-process gather, sampling, the
# reasoning eval). The other layouts are equal to the unshared one on one process in the
# default suite (tests/test_train.py), and in pods with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_pod_equals_one_process(feature, tiny, tmp_path, tiny_config, subprocess_env):
    n, d, overrides = FEATURES[feature]
    _run_pod(tiny, tmp_path / "pod", overrides, n=n, d=d, env=subprocess_env)
    _one_process(tiny, tmp_path / "one", overrides, tiny_config)
    _same_run(tmp_path / "pod", tmp_path / "one")
    _same_cache(tmp_path / "pod", tmp_path / "one", n)
    if "eval.reasoning_tasks" in overrides:  # the completions themselves agree
        a, b = (json.load(open(tmp_path / w / "reasoning_eval" / "step_6.json"))
                for w in ("pod", "one"))
        assert a["completions"] == b["completions"]


def test_mixture_of_experts_pod_equals_one_process(tiny, tmp_path, tiny_config, subprocess_env):
    """A tiny Qwen3-MoE over 2 processes x 4 devices, its experts split over an expert axis
    and the router's load-balancing loss on, equals one process of 8 devices."""
    from mio_jax import testing

    moe = (testing.write_tiny_model(str(tmp_path / "moe"), config=testing.tiny_moe_config),
           *tiny[1:])
    overrides = {"mesh.shape": (1, 2, 2, 2), "mesh.axes": ("data", "fsdp", "tensor", "expert"),
                 "loss.router_aux_loss_coef": 0.01, "train.steps": 4, "eval.every_steps": 2}
    _run_pod(moe, tmp_path / "pod", overrides, n=2, d=4, env=subprocess_env)
    _one_process(moe, tmp_path / "one", overrides, tiny_config)
    _same_run(tmp_path / "pod", tmp_path / "one")
    rows = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows and all(r["router/assignments_per_token"] == 2.0 for r in train_rows)


@pytest.mark.slow  # about 40 s on 2 cores; the online pod gathers precomputed tables too
def test_k_way_groups_with_precomputed_reference(kway_files, tmp_path, tiny_config,
                                                 subprocess_env):
    overrides = {"data.format": "kway", "data.kway_mode": "group", "data.num_negatives": 2,
                 "loss.name": "js_multi", "reference.mode": "precomputed"}
    _run_pod(kway_files, tmp_path / "pod", overrides, n=2, d=4, env=subprocess_env)
    out = _one_process(kway_files, tmp_path / "one", overrides, tiny_config)
    assert out["train"]["num_groups"] == 8 and np.isfinite(out["train"]["loss"])
    _same_run(tmp_path / "pod", tmp_path / "one")


# (processes, devices each, the process signalled, the layout the run resumes on); the
# default suite signals process 0 of 2 and resumes on 1 process, -m slow adds the others
@pytest.mark.parametrize("n,d,target,resume", [
    pytest.param(2, 4, 1, (4, 2), marks=pytest.mark.slow), (2, 4, 0, (1, 8)),
    pytest.param(4, 2, 2, (2, 4), marks=pytest.mark.slow)])
def test_preemption_of_any_process_checkpoints_one_step_and_resumes_exactly(
        n, d, target, resume, tiny, tmp_path, tiny_config, subprocess_env):
    """SIGTERM to ONE process: every process saves the same step (JAX's preemption sync
    point) and exits 143; resuming, here on another process count and mesh, equals the
    uninterrupted run, and convert reads the checkpoint the pod wrote."""
    overrides = {"train.steps": 30, "checkpoint.every_steps": 1000, "eval.every_steps": 0}
    work = tmp_path / "pod"
    pod = _pod(tiny, work, overrides, n=n, d=d, env=subprocess_env)
    metrics = work / "metrics.jsonl"
    pod.wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
                   POD_TIMEOUT)
    pod.signal(target, signal.SIGTERM)
    results = pod.wait(60, check=False)
    assert [r.returncode for r in results] == [143] * n, pod._report("exit statuses")
    saved = sorted(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 30, saved
    for r in results:  # the agreed step, on every host
        assert f"checkpoint at step {saved[0]} written" in r.log
    # elastic resume: another process count and another (data, fsdp) split of the mesh
    # (one process of 8 devices: this one)
    resumed = {**overrides, "mesh.shape": (2, -1, 1)}
    if resume == (1, 8):
        _one_process(tiny, work, resumed, tiny_config)
    else:
        _run_pod(tiny, work, resumed, n=resume[0], d=resume[1], env=subprocess_env)
    _one_process(tiny, tmp_path / "one", overrides, tiny_config)
    _same_run(work, tmp_path / "one")
    # convert of the checkpoint several processes wrote == the run's own export
    dst = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "mio_jax.convert", str(work), str(dst)], check=True,
                   env=subprocess_env, cwd=ROOT, capture_output=True)
    got, want = load_file(str(dst / "model.safetensors")), run_compare.exported_weights(work)
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _process_files(step_dir, index):
    """The array data files process ``index`` wrote for a checkpoint step (OCDBT)."""
    return [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
            if f"ocdbt.process_{index}" in r and os.path.basename(r) == "d"]


def test_a_shard_unreadable_on_one_host_makes_all_fall_back_together(tiny, tmp_path, tiny_config,
                                                                    subprocess_env):
    """A pod of 2 processes: process 1's shard of the newest checkpoint torn, every process
    falls back to the one before, and the resumed run equals one process (its tokenized
    cache built in 2 parts equal to one)."""
    overrides = {"train.steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 0}
    work = tmp_path / "pod"
    _run_pod(tiny, work, overrides, n=2, d=4, env=subprocess_env)
    broken = _process_files(work / "checkpoints" / "4" / "state", 1)
    assert broken, os.listdir(work / "checkpoints" / "4" / "state")
    for path in broken:  # only host 1's shard of the newest step is torn
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    before = sorted(os.listdir(work / "checkpoints"))
    shutil.rmtree(work / "hf_export")
    results = _run_pod(tiny, work, overrides, n=2, d=4, env=subprocess_env)
    assert "resumed from" in results[0].log and "at step 2" in results[0].log
    assert "unreadable on process(es) [1]" in results[0].log
    assert sorted(os.listdir(work / "checkpoints")) == before  # nothing moved or deleted
    _one_process(tiny, tmp_path / "one", overrides, tiny_config)
    _same_run(work, tmp_path / "one")
    _same_cache(work, tmp_path / "one", 2)


# -m slow: one process's CheckpointMismatch is tests/test_checkpoint.py's, and the pod's
# agreement on a restore outcome is the torn-shard test's above
@pytest.mark.slow
def test_a_changed_state_stops_every_process_naming_the_difference(tiny, tmp_path,
                                                                   subprocess_env):
    overrides = {"train.steps": 2, "checkpoint.every_steps": 2, "eval.every_steps": 0,
                 "checkpoint.export_hf": False}
    work = tmp_path / "pod"
    _run_pod(tiny, work, overrides, n=2, d=4, env=subprocess_env)
    listing = sorted(os.listdir(work / "checkpoints" / "2"))
    results = _pod(tiny, work, {**overrides, "optim.mu_dtype": "bfloat16"}, n=2, d=4,
                   env=subprocess_env).wait(POD_TIMEOUT, check=False)
    assert [r.returncode for r in results] == [2, 2]
    assert "does not match this run's train state" in results[0].log
    assert "mu/embed: saved (96, 32) float32, run (96, 32) bfloat16" in results[0].log
    assert sorted(os.listdir(work / "checkpoints" / "2")) == listing
    assert sorted(os.listdir(work / "checkpoints")) == ["2"]


@pytest.mark.parametrize("command", ["mio_jax.evaluate", "mio_jax.pairs"])
def test_one_process_commands_refuse_a_pod(command, subprocess_env):
    env = dict(subprocess_env, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0",
               JAX_COORDINATOR_ADDRESS="127.0.0.1:1")
    args = (["--model=smollm2", "--task=chain_sum"] if command.endswith("evaluate")
            else ["--config=nothing.py"])
    out = subprocess.run([sys.executable, "-m", command, *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "runs on one process" in out.stderr, out.stderr[-2000:]


def test_local_pod_kills_every_process_and_shows_the_logs_when_one_fails(tmp_path):
    code = ("import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); "
            "print('process', i, os.environ['JAX_NUM_PROCESSES'], os.environ['XLA_FLAGS']); "
            "sys.stdout.flush(); sys.exit(3) if i == 1 else time.sleep(600)")
    pod = local_pod.LocalPod([sys.executable, "-c", code], num_processes=3,
                             devices_per_process=2, log_dir=str(tmp_path))
    with pytest.raises(local_pod.PodFailed) as info:
        pod.wait(120, grace=1.0)
    text = str(info.value)
    assert "{0: None, 1: 3, 2: None}" in text  # 0 and 2 were killed after 1 failed
    assert "process 1 3 " in text and text.count("--xla_force_host_platform_device_count=2") >= 1
    assert "--xla_force_host_platform_device_count=8" not in text  # the test's own, replaced
    assert all(p.poll() is not None for p in pod.procs)


def test_pod_processes_keep_the_other_xla_flags():
    """An instruction-set cap (or any other XLA flag) reaches every process of a pod; only
    the device count is the pod's own."""
    env = local_pod.process_env(1, 2, 4, 1234, base={
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2 --xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--xla_cpu_max_isa=AVX2 --xla_force_host_platform_device_count=4"
    assert env["JAX_PROCESS_ID"] == "1" and env["JAX_NUM_PROCESSES"] == "2"


# both launchers hand over to the same local rehearsal (the pods above test that
# rehearsal); each launcher's own contract is checked with -m slow (about 20 s each)
@pytest.mark.slow
@pytest.mark.parametrize("script", ["slurm_gpu.sh", "tpu_pod.sh"])
def test_launchers_rehearse_a_pod_on_this_machine(script, tiny, tmp_path, tiny_config,
                                                  subprocess_env):
    """MIO_LOCAL_PROCESSES runs the launcher's own contract with N local processes (SLURM's
    variables simulated for slurm_gpu.sh); the run equals one process."""
    env = dict(subprocess_env, MIO_LOCAL_PROCESSES="2", MIO_LOCAL_DEVICES="4")
    flags = _command(tiny, tmp_path / "pod", {})[3:]  # what follows "python -m mio_jax.main"
    out = subprocess.run(["bash", os.path.join("launch", script), *flags], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=POD_TIMEOUT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    _one_process(tiny, tmp_path / "one", {}, tiny_config)
    _same_run(tmp_path / "pod", tmp_path / "one")
