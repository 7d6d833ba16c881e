"""``gs://`` wherever a local path goes, against a real local GCS server.

``tests/conftest.py``'s ``gcs`` fixture starts ``gcp-storage-emulator`` (in memory) and
points gcsfs (``STORAGE_EMULATOR_HOST``) and tensorstore, Orbax's array I/O
(``TENSORSTORE_GCS_HTTP_URL``), at it; ``gcs_env`` passes the same to subprocesses. A run
whose model, data and workdir all live in the bucket is killed, resumes from its
``gs://`` checkpoint and ends equal to an uninterrupted local run; two processes sharing
one ``gs://`` workdir equal one process; and each path helper and converted reader is
checked on ``gs://`` by value.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import fsspec
import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

import run_compare
import tolerance
from mio_jax import local_pod, paths, plot, reference, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = tolerance.TIMING
TIMEOUT = 300
# One run, in the bucket and on local disk: a precomputed reference (its cache in the
# workdir), evals and checkpoints every 4 steps.
OVERRIDES = {"train.steps": 16, "checkpoint.every_steps": 4, "eval.every_steps": 4,
             "reference.mode": "precomputed"}


def _url(gcs, name: str) -> str:
    """A fresh prefix in the emulator's bucket (one server serves the whole session)."""
    return f"gs://{gcs.bucket}/{name}-{uuid.uuid4().hex[:8]}"


def _fresh() -> None:
    """Forgets gcsfs's cached listings (another process wrote to the bucket)."""
    fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()


def _upload_tree(local: str, url: str) -> str:
    for root, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local)
            paths.upload(os.path.join(root, f), paths.join(url, *rel.split(os.sep)))
    return url


def _command(files, workdir, overrides: dict) -> list[str]:
    m, t, e = files
    base = {"model.path": m, "data.train_path": t, "data.eval_path": e, **overrides}
    return [sys.executable, "-m", "mio_jax.main", "--config=configs/tiny_test.py",
            f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in base.items()]]


def _rows(workdir) -> list[dict]:
    text = paths.read_text(paths.join(str(workdir), "metrics.jsonl"))
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in text.splitlines()]


def _weights(folder) -> dict[str, np.ndarray]:
    out = {}
    for name in paths.listdir(str(folder)):
        if name.endswith(".safetensors"):
            out.update(load_safetensors(paths.read_bytes(paths.join(str(folder), name))))
    return out


def _committed(workdir, step) -> bool:
    """Orbax commits a step in an object store by writing its commit_success.txt last."""
    return paths.exists(paths.join(workdir, "checkpoints", str(step), "commit_success.txt"))


def _steps(workdir) -> list[int]:
    """The committed checkpoint steps of a gs:// workdir."""
    _fresh()
    folder = paths.join(workdir, "checkpoints")
    return sorted(int(s) for s in paths.listdir(folder) if s.isdigit() and _committed(workdir, s))


def _assert_equal_weights(a, b):
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def remote_tiny(gcs, tiny):
    """The ``tiny`` model folder and data files, uploaded to the bucket."""
    base = _url(gcs, "tiny")
    model, train_jsonl, eval_jsonl = tiny
    out = [_upload_tree(model, paths.join(base, "tiny_model"))]
    for local in (train_jsonl, eval_jsonl):
        out.append(paths.join(base, "data", os.path.basename(local)))
        paths.upload(local, out[-1])
    return tuple(out)


@pytest.fixture(scope="module")
def local_run(tiny, tiny_config, tmp_path_factory):
    """The uninterrupted run of ``OVERRIDES`` on local files, in this process (8 devices)."""
    work = str(tmp_path_factory.mktemp("local") / "run")
    train.train_and_evaluate(tiny_config(*tiny, **OVERRIDES), work)
    return work


# ---- whole runs ------------------------------------------------------------------------

def test_a_run_all_in_gcs_killed_then_resumed_equals_a_local_run(
        remote_tiny, local_run, gcs, gcs_env, tmp_path):
    """Model, data and workdir in the bucket: SIGKILL once the step-4 checkpoint is
    committed, a second run resumes from the newest gs:// checkpoint (and the reference
    cache) and ends with the metrics rows and exported weights of the uninterrupted local
    run; convert reads the gs:// checkpoint back to gs:// with the export's weights."""
    work = _url(gcs, "run")
    cmd = _command(remote_tiny, work, OVERRIDES)
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=gcs_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not _committed(work, 4):
            assert proc.poll() is None, log.read_text()[-4000:]
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("timed out: " + log.read_text()[-4000:])
            time.sleep(0.1)
            _fresh()
        proc.send_signal(signal.SIGKILL)
        proc.wait(120)
    first = _steps(work)
    assert 4 <= first[-1] < 16, first
    assert not paths.exists(paths.join(work, "hf_export")), "the run ended before the kill"
    assert not os.path.exists(os.path.join(ROOT, "gs:")), "a URL became a local folder"

    second = subprocess.run(cmd, env=gcs_env, cwd=ROOT, capture_output=True, text=True,
                            timeout=TIMEOUT)
    (tmp_path / "second.log").write_text(second.stderr)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resumed from {work}/checkpoints at step {first[-1]}" in second.stderr
    assert "reference log-probs (train): cache hit " + work in second.stderr
    assert f"data cache: hit {work}/data_cache/train-" in second.stderr  # no re-tokenising
    _fresh()
    assert paths.read_json(paths.join(work, "config.json"))["model"]["path"] == remote_tiny[0]
    a, b = _rows(work), _rows(local_run)
    assert [r["step"] for r in b if r["split"] == "train"] == list(range(1, 17))
    assert a == b
    exported = _weights(paths.join(work, "hf_export"))
    _assert_equal_weights(exported, _weights(os.path.join(local_run, "hf_export")))

    converted = paths.join(work, "converted")
    out = subprocess.run([sys.executable, "-m", "mio_jax.convert", work, converted],
                         env=gcs_env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-4000:]
    _fresh()
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json"} <= set(paths.listdir(converted))
    _assert_equal_weights(_weights(converted), exported)


@pytest.mark.slow  # a pod writing gs:// (about 50 s on 2 cores); pods and gs:// each run by default
def test_two_processes_sharing_a_gcs_workdir_equal_one_process(remote_tiny, local_run, gcs,
                                                               gcs_env, tmp_path):
    """A pod of 2 x 4 devices on one gs:// workdir (each process reads its share of the
    gs:// data, caches its reference rows there, writes its checkpoint shards) equals the
    one-process local run."""
    work = _url(gcs, "pod")
    pod = local_pod.LocalPod(_command(remote_tiny, work, OVERRIDES), num_processes=2,
                             devices_per_process=4, env=gcs_env, cwd=ROOT,
                             log_dir=str(tmp_path / "logs"))
    pod.wait(TIMEOUT)
    _fresh()
    assert _steps(work) == [4, 8, 12, 16]
    caches = [n for n in paths.listdir(paths.join(work, "reference_cache"))
              if n.endswith(".npz")]
    assert sorted(n.rsplit("_", 1)[-1] for n in caches) == ["p0.npz", "p0.npz", "p1.npz",
                                                             "p1.npz"]  # train and eval
    # the tokenized cache in the bucket, built in two parts (one per process)
    for folder in paths.listdir(paths.join(work, "data_cache")):
        assert paths.listdir(paths.join(work, "data_cache", folder)) == [
            "manifest.json", "part-00000-of-00002.arrow", "part-00001-of-00002.arrow"]
    a, b = _rows(work), _rows(local_run)
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    beta, lr = run_compare.run_settings(local_run)
    for ra, rb in zip(a, b):
        tolerance.assert_rows_close(ra, rb, beta=beta, updates=rb["step"] - (rb["split"] == "train"),
                                    what=f"{rb['split']} step {rb['step']}")
    tolerance.assert_params_close(_weights(paths.join(work, "hf_export")),
                                  _weights(os.path.join(local_run, "hf_export")),
                                  learning_rate=lr, updates=max(r["step"] for r in b))


# ---- the path layer on gs:// -----------------------------------------------------------

def test_atomic_writes_read_back_and_leave_nothing_beside(gcs):
    base = _url(gcs, "io")
    paths.write_text(paths.join(base, "a", "x.txt"), "first")
    paths.write_text(paths.join(base, "a", "x.txt"), "second")  # replaces
    paths.write_json(paths.join(base, "a", "y.json"), {"k": [1, 2]}, indent=1)
    paths.write_bytes(paths.join(base, "b.bin"), b"\x00\xff")
    assert paths.read_text(paths.join(base, "a", "x.txt")) == "second"
    assert paths.read_json(paths.join(base, "a", "y.json")) == {"k": [1, 2]}
    assert paths.read_bytes(paths.join(base, "b.bin")) == b"\x00\xff"
    assert paths.listdir(base) == ["a", "b.bin"]
    assert paths.listdir(paths.join(base, "a")) == ["x.txt", "y.json"]
    assert paths.isdir(paths.join(base, "a")) and paths.isfile(paths.join(base, "b.bin"))
    assert not paths.exists(paths.join(base, "c")) and paths.size(paths.join(base, "b.bin")) == 2
    with paths.open(paths.join(base, "a", "x.txt")) as f:
        assert f.read() == "second"
    assert paths.resolve(base + "/") == base and paths.dirname(paths.join(base, "b.bin")) == base


def test_glob_matches_after_the_bucket(gcs):
    base = _url(gcs, "glob")
    for name in ("a.jsonl", "b.jsonl", "c.txt", "sub/d.jsonl"):
        paths.write_text(paths.join(base, name), name)
    assert paths.glob(base + "/*.jsonl") == [f"{base}/a.jsonl", f"{base}/b.jsonl"]
    assert paths.glob(base + "/*/d.jsonl") == [f"{base}/sub/d.jsonl"]
    assert paths.glob(base + "/[bc].*") == [f"{base}/b.jsonl", f"{base}/c.txt"]
    assert paths.glob(base + "/missing/*.jsonl") == []


def test_append_file_uploads_on_sync_and_close_and_resumes(gcs):
    path = paths.join(_url(gcs, "append"), "log.txt")
    f = paths.AppendFile(path, initial="", upload_every=3600)
    assert paths.read_text(path) == ""  # the initial text is uploaded at once
    f.write("a\n")
    f.sync()  # within upload_every of the last upload: nothing sent
    assert paths.read_text(path) == ""
    f.write("b\n")
    f.sync(force=True)
    assert paths.read_text(path) == "a\nb\n"
    f.write("c\n")
    f.close()
    f.close()  # a second close is a no-op
    assert paths.read_text(path) == "a\nb\nc\n"
    g = paths.AppendFile(path, upload_every=3600)  # resumes from what the object holds
    g.write("d\n")
    g.close()
    assert paths.read_text(path) == "a\nb\nc\nd\n"
    h = paths.AppendFile(path, initial="x\n")  # replaces it
    h.close()
    assert paths.read_text(path) == "x\n"


def test_local_copy_stages_once_and_follows_changes(gcs, tmp_path):
    base = _url(gcs, "stage")
    paths.write_text(paths.join(base, "m", "config.json"), "{}")
    paths.write_bytes(paths.join(base, "m", "sub", "w.bin"), b"1234")
    paths.write_bytes(paths.join(base, "m", "extra.bin"), b"e")
    local = paths.local_copy(paths.join(base, "m"))
    assert os.path.isdir(local) and local.startswith(os.environ[paths.STAGING_ENV])
    with open(os.path.join(local, "sub", "w.bin"), "rb") as f:
        assert f.read() == b"1234"
    inode = os.stat(os.path.join(local, "sub", "w.bin")).st_ino
    assert paths.local_copy(paths.join(base, "m")) == local  # reused, not downloaded again
    assert os.stat(os.path.join(local, "sub", "w.bin")).st_ino == inode
    time.sleep(1.1)  # object times have whole seconds
    paths.write_bytes(paths.join(base, "m", "sub", "w.bin"), b"5678")  # same size, new bytes
    paths.as_path(paths.join(base, "m", "extra.bin")).unlink()
    assert paths.local_copy(paths.join(base, "m")) == local
    with open(os.path.join(local, "sub", "w.bin"), "rb") as f:
        assert f.read() == b"5678"
    assert sorted(os.listdir(local)) == ["config.json", "sub"]
    one = paths.local_copy(paths.join(base, "m", "config.json"))  # a single file
    with open(one) as f:
        assert f.read() == "{}"
    local_file = tmp_path / "here.txt"
    local_file.write_text("x")
    assert paths.local_copy(str(local_file)) == str(local_file)  # local paths as they are
    with pytest.raises(FileNotFoundError):
        paths.local_copy(paths.join(base, "nothing"))


# ---- the converted readers and writers on gs:// ----------------------------------------

def test_reference_cache_written_and_hit_in_gcs(gcs):
    from test_reference import _host_batches, _ref_fn

    cache_dir = paths.join(_url(gcs, "refcache"), "cache")
    calls = []
    kw = dict(cache_dir=cache_dir, ref_fn=_ref_fn(calls), settings={"dtype": "float32"},
              weights_fp="w0", name="train")
    t1, p1, hit1 = reference.build_or_load(batches=lambda: _host_batches(), **kw)
    assert not hit1 and len(calls) == 3 and p1.startswith(cache_dir + "/reference_logps_train_")
    assert paths.read_json(p1 + ".json")["groups"] == 10
    t2, p2, hit2 = reference.build_or_load(batches=lambda: _host_batches(), **kw)
    assert hit2 and p2 == p1 and len(calls) == 3  # read back from the bucket, no forward pass
    np.testing.assert_array_equal(t1.lookup(np.arange(10)), t2.lookup(np.arange(10)))
    want = np.concatenate([_ref_fn([])(b) for b in _host_batches()])[:10]
    np.testing.assert_allclose(t2.lookup(np.arange(10)), want)


def test_plot_reads_a_gcs_workdir_and_writes_its_png_there(gcs, capsys):
    work = _url(gcs, "plotrun")
    rows = [{"step": 1, "split": "train", "loss": 0.7}, {"step": 2, "split": "train", "loss": 0.5},
            {"step": 2, "split": "eval", "loss": 0.6, "accuracy": 0.25}]
    paths.write_text(paths.join(work, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    paths.write_json(paths.join(work, "config.json"), {"loss": {"name": "dpo"}})
    series = plot.read_metrics(work)
    assert series["loss"] == ([1, 2], [0.7, 0.5])
    assert series["eval/loss"] == ([2], [0.6]) and series["eval/accuracy"] == ([2], [0.25])
    assert plot.run_label(work) == f"{paths.basename(work)} (dpo)"
    plot.main([work])
    assert paths.read_bytes(paths.join(work, "curves.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    out = paths.join(_url(gcs, "plots"), "runs.png")
    plot.main([work, "--out", out])
    assert paths.read_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.read_metrics(_url(gcs, "empty"))


def test_hf_folder_written_to_gcs_and_loaded_from_there(gcs, tiny, tmp_path):
    import jax
    from flax import nnx

    from mio_jax import convert, models

    base = _url(gcs, "hf")
    model = models.load_pretrained(tiny[0])
    tokenizer = models.load_tokenizer(tiny[0])
    sharded = models.save_pretrained(model, tokenizer, base, max_shard_size=8000)
    assert len(sharded) > 1 and set(sharded) <= set(paths.listdir(base))
    assert "model.safetensors.index.json" in paths.listdir(base)
    _assert_equal_weights(_weights(base), _weights(tiny[0]))
    # a one-shard export over it: the old shards and index are gone
    assert models.save_pretrained(model, tokenizer, base) == ["model.safetensors"]
    names = paths.listdir(base)
    assert [n for n in names if n.startswith("model")] == ["model.safetensors"]
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(names)
    back = models.load_pretrained(base)  # staged, then read like a local folder
    assert back.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(back, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert models.load_tokenizer(base)("q: 1+2=")["input_ids"] == tokenizer("q: 1+2=")["input_ids"]
    assert models.resolve_model_path(base).startswith(os.environ[paths.STAGING_ENV])
    assert convert.main([base, str(tmp_path / "converted")]) == 0  # a gs:// HF folder in
    _assert_equal_weights(_weights(tmp_path / "converted"), _weights(tiny[0]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model_path(paths.join(base, "missing"))


def test_pairs_writes_rows_and_stats_to_gcs(gcs):
    from mio_jax import pairs
    from mio_jax.data.sources import iter_jsonl

    out = paths.join(_url(gcs, "pairs"), "pairs.jsonl.gz")
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "i": i} for i in range(3)]
    pairs.write_rows(rows, out)
    assert [row for _, row in iter_jsonl(out)] == rows
    cfg = pairs.default_config()
    cfg.tasks, cfg.num_prompts, cfg.seed, cfg.num_samples = "chain_sum", 2, 11, 2
    cfg.out = paths.join(_url(gcs, "pairs"), "run.jsonl")
    report = pairs.run(cfg, sampler=lambda prompts: ["The answer is -1."] * len(prompts),
                       progress=False)
    assert paths.read_json(cfg.out + ".stats.json")["stats"] == report["stats"]
    assert report["stats"]["prompts"] == 2 and paths.read_text(cfg.out) == ""



def test_gguf_in_gcs_converts_to_gcs_and_local_folders(gcs, tmp_path):
    """A .gguf given as a gs:// URL (staged once) -> HF folders in the bucket (streamed)
    and on local disk (load_pretrained + save_pretrained), with the file's tensors."""
    from mio_jax import convert
    from mio_jax.models import load_tokenizer

    sys.path.insert(0, os.path.join(ROOT, "tests", "models"))
    from test_convert import VOCAB, _tokenizer_kv
    from test_gguf_io import tiny_hf_tensors, write_tiny_gguf

    hf = tiny_hf_tensors(seed=3, vocab=VOCAB, tied=False)
    local = write_tiny_gguf(tmp_path / "tiny.gguf", hf, tokenizer=_tokenizer_kv, vocab=VOCAB)
    src = paths.join(_url(gcs, "gguf"), "tiny.gguf")
    paths.upload(local, src)
    streamed = paths.join(_url(gcs, "gguf_out"), "hf")
    assert convert.main([src, streamed, "--exporter=stream"]) == 0
    got = _weights(streamed)
    assert sorted(got) == sorted(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert load_tokenizer(streamed).encode("a") == load_tokenizer(local).encode("a")
    assert load_tokenizer(src).encode("a") == load_tokenizer(local).encode("a")
    loaded = str(tmp_path / "loaded")
    assert convert.main([src, loaded]) == 0
    _assert_equal_weights(_weights(loaded), got)


def test_evaluate_reads_model_and_rows_from_gcs_and_writes_its_report_there(remote_tiny, gcs):
    from mio_jax import evaluate

    rows = paths.join(_url(gcs, "eval"), "qa.jsonl")
    paths.write_text(rows, "".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                   for i in range(2)))
    out = paths.join(_url(gcs, "eval"), "report.json")
    evaluate.main([f"--model={remote_tiny[0]}", f"--jsonl={rows}", "--num_examples=2",
                   "--max_new_tokens=2", "--batch_size=2", f"--out={out}"])
    report = paths.read_json(out)
    assert report["args"]["out"] == out and report["results"]["jsonl"]["overall"]["n"] == 2
    assert [c["question"] for c in report["results"]["jsonl"]["completions"]] == ["0+1=", "1+1="]


def test_data_inspect_reads_a_gcs_model_and_data(remote_tiny, tiny_config):
    from mio_jax.data import inspect, pipeline

    cfg = tiny_config(*remote_tiny)
    tokenizer = inspect.load_tokenizer_for(cfg)  # the tokenizer of the gs:// model folder
    prepared = pipeline.prepare(cfg.data, tokenizer, split="train")
    text = inspect.report_text(prepared, tokenizer, cfg.data, examples=1)
    assert f"--- example 0 ({remote_tiny[1]}:1)" in text


def test_local_runs_import_no_cloud_library(tmp_path):
    """Local paths through every helper, the data cache and the trainer's modules load
    neither fsspec nor gcsfs (nor any other storage client)."""
    code = f"""
import sys
from mio_jax import paths, testing, train
from mio_jax.data import config, pipeline
d = {str(tmp_path)!r}
paths.write_json(paths.join(d, "a.json"), {{"a": 1}})
assert paths.read_json(paths.join(d, "a.json")) == {{"a": 1}} and paths.local_copy(d) == d
data = testing.write_tiny_data(paths.join(d, "t.jsonl"), 8)
c = config.default_data_config()
with c.unlocked():
    c.train_path = data
pipeline.prepare(c, testing.tiny_tokenizer(), cache_dir=paths.join(d, "cache"))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("fsspec", "gcsfs", "s3fs", "adlfs")
             or m.startswith(("google.cloud.storage", "google.auth"))))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST",)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
