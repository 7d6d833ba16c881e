"""FLOP accounting, peak table, writers (JSONL, TensorBoard, W&B; local and gs://), NaN
guard, throughput, the ``log`` config section."""

import glob
import json
import logging
import os
import struct
import sys
import time
import zlib

import pytest
from absl import logging as absl_logging

from mio_jax import config as mio_config
from mio_jax import metrics, paths, periodic, testing


def test_flops_per_token_closed_form():
    fm = metrics.FlopModel(matmul_params=1_000_000, n_layers=2, attn_dim=64)
    assert fm.train_flops_per_token(32) == 6e6 + 6 * 2 * 64 * 32
    assert fm.forward_flops_per_token(32) == 2e6 + 2 * 2 * 64 * 32
    train_only = metrics.step_flops(fm, tokens=100, seq_len=32, reference_runs=False)
    with_ref = metrics.step_flops(fm, tokens=100, seq_len=32, reference_runs=True)
    assert train_only == 100 * (6e6 + 24576)
    # the frozen reference adds exactly a forward pass (1/3 of the policy's 6N)
    assert with_ref - train_only == 100 * (2e6 + 8192)


def test_peak_flops_table_and_override():
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_per_device("TPU v5p") == 459e12
    assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
    assert metrics.peak_flops_per_device("TPU v4") == 275e12
    assert metrics.peak_flops_per_device("cpu") is None
    assert metrics.peak_flops_per_device("cpu", override=2e11) == 2e11


def test_check_finite_names_step_indices_and_metric():
    metrics.check_finite({"loss": 0.5, "grad_norm": 1.0}, step=3)
    with pytest.raises(FloatingPointError, match=r"\['loss'\] at step 7; batch indices \[4, 9\]"):
        metrics.check_finite({"loss": float("nan"), "grad_norm": 1.0}, step=7,
                             batch_indices=[4, 9])
    with pytest.raises(FloatingPointError, match="grad_norm"):
        metrics.check_finite({"loss": 1.0, "grad_norm": float("inf")}, step=1)


def test_jsonl_and_tensorboard_writers_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = metrics.make_writers(str(tmp_path))
    w.write(1, {"loss": 0.7, "rewards/accuracies": 0.5})
    w.write(2, {"loss": 0.6, "rewards/accuracies": 0.75})
    w.write(2, {"loss": 0.65}, split="eval")
    w.close()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert rows[1] == {"step": 2, "split": "train", "loss": 0.6, "rewards/accuracies": 0.75}
    assert rows[2]["split"] == "eval"
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 0.7), (2, 0.6)]
    assert [e.value for e in acc.Scalars("eval/loss")] == pytest.approx([0.65])


def test_throughput_and_mfu():
    fm = metrics.FlopModel(matmul_params=10**6, n_layers=1, attn_dim=8)
    thr = metrics.Throughput(fm, peak_flops=1e9, num_devices=2, reference_runs=True)
    thr.add(tokens=1000, seq_len=16)
    thr._t0 = time.perf_counter() - 2.0  # as if 2 s had passed
    out = thr.report()
    flops = 1000 * (fm.train_flops_per_token(16) + fm.forward_flops_per_token(16))
    assert out["tokens_per_sec"] == pytest.approx(500, rel=0.05)
    assert out["mfu"] == pytest.approx(flops / 2.0 / 2e9, rel=0.05)
    assert thr.report()["tokens_per_sec"] == 0.0  # reset after each report


def test_progress_bar_runs(capsys):
    p = metrics.Progress(10, 0)
    p.update(3, {"loss": 0.5, "rewards/accuracies": 1.0})
    p.close()
    assert "acc=1.000" in capsys.readouterr().err


def _tb_scalars(logdir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(paths.local_copy(logdir))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def _jsonl(path):
    return [json.loads(x) for x in paths.read_text(path).splitlines()]


def _next_second():
    """Event files sort by creation second, then by a per-process counter compared as text
    (10 before 9): a resumed writer's file must come from a later second."""
    t = int(time.time())
    while int(time.time()) == t:
        time.sleep(0.02)


def _resume_round_trip(workdir):
    """Steps 1-4 written, a resume from step 2 writes step 3 again: both files read like
    one uninterrupted run."""
    w = metrics.make_writers(workdir)
    for s in (1, 2, 3, 4):
        w.write(s, {"loss": float(s)})
    w.close()
    _next_second()
    w = metrics.make_writers(workdir, resume_step=2)
    w.write(3, {"loss": 30.0})
    w.close()
    rows = _jsonl(paths.join(workdir, "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert _tb_scalars(paths.join(workdir, "tb")) == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_resume_drops_rows_after_the_restored_step(tmp_path):
    _resume_round_trip(str(tmp_path))


def test_resume_drops_a_row_cut_short_and_step_0_starts_afresh(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    metrics.JsonlWriter(str(path), resume_step=5).close()  # a kill mid-row, then a resume
    assert _jsonl(str(path)) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    w = metrics.make_writers(str(tmp_path))
    w.write(3, {"loss": 3.0})
    w.close()
    _next_second()
    w = metrics.make_writers(str(tmp_path), resume_step=0)  # no checkpoint: from scratch
    w.write(1, {"loss": 9.0})
    w.close()
    assert _jsonl(str(path)) == [{"step": 1, "split": "train", "loss": 9.0}]
    assert _tb_scalars(str(tmp_path / "tb")) == [(1, 9.0)]


# ---- gs:// workdirs (a local GCS emulator) ------------------------------------------------

@pytest.fixture(scope="module")
def gcs():
    gcsfs_log = logging.getLogger("gcsfs")  # "Could not determine bucket type" (no ADC)
    level = gcsfs_log.level
    gcsfs_log.setLevel(logging.ERROR)
    try:
        with testing.GcsEmulator() as emulator:
            yield emulator
    finally:
        gcsfs_log.setLevel(level)


def test_gs_writers_round_trip(gcs, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics.tempfile, "tempdir", str(tmp_path))  # staging, checked below
    work = f"gs://{gcs.bucket}/round_trip"
    w = metrics.make_writers(work)
    w.write(1, {"loss": 0.7, "rewards/accuracies": 0.5})
    w.write(2, {"loss": 0.6, "rewards/accuracies": 0.75})
    w.write(2, {"loss": 0.65}, split="eval")
    w.close()
    assert not os.listdir(tmp_path), "local mirrors and staging folders are removed"
    assert _jsonl(work + "/metrics.jsonl") == [
        {"step": 1, "split": "train", "loss": 0.7, "rewards/accuracies": 0.5},
        {"step": 2, "split": "train", "loss": 0.6, "rewards/accuracies": 0.75},
        {"step": 2, "split": "eval", "loss": 0.65}]
    assert _tb_scalars(work + "/tb") == [(1, 0.7), (2, 0.6)]
    assert _tb_scalars(work + "/tb", "eval/loss") == [(2, 0.65)]
    assert _tb_scalars(work + "/tb", "train/rewards/accuracies") == [(1, 0.5), (2, 0.75)]


def test_gs_resume_drops_rows_after_the_restored_step(gcs):
    _resume_round_trip(f"gs://{gcs.bucket}/resume")


class _Info:
    tokens, seq_len = 10, 4


class _RecordingCheckpointer:
    """Records what the remote metrics file holds when each checkpoint is saved."""

    def __init__(self, path):
        self.path, self.seen = path, {}

    def save(self, step, state, *, data_state=None, config=None):
        self.seen[step] = [r["step"] for r in _jsonl(self.path)]


class _Position:
    def get_state(self):
        return {}


def test_rows_are_uploaded_before_each_checkpoint_is_saved(gcs):
    """A kill right after a checkpoint at step s loses no row <= s: the (throttled) remote
    writers are force-synced before the checkpoint is saved, after the rows of s."""
    work = f"gs://{gcs.bucket}/synced"
    writer = metrics.MultiWriter([metrics.JsonlWriter(work + "/metrics.jsonl",
                                                      upload_every=1e9),
                                  metrics.TensorBoardWriter(work + "/tb", upload_every=1e9)])
    throughput = metrics.Throughput(None, None, 1, reference_runs=False)
    window = periodic.MetricsWindow(writer, metrics.Progress(6, enabled=False), throughput,
                                    every=1, total_steps=6)
    ckpt = _RecordingCheckpointer(work + "/metrics.jsonl")
    checkpoints = periodic.Checkpoints(ckpt, every=2, data_iterator=_Position(), config={},
                                       window=window)
    for step in range(1, 6):
        window.add(step, {"loss": float(step)}, _Info(), [0])  # fetched one step late
        checkpoints(step, state=None)
    assert ckpt.seen == {2: [1, 2], 4: [1, 2, 3, 4]}
    assert _tb_scalars(work + "/tb") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    window.flush()
    writer.close()
    assert [r["step"] for r in _jsonl(work + "/metrics.jsonl")] == [1, 2, 3, 4, 5]


# ---- Weights & Biases ------------------------------------------------------------------------

_BLOCK, _CHUNK_HEADER = 32768, 7


def wandb_records(path):
    """The records of a ``.wandb`` file (wandb >= 0.18 writes it from its Go core, and the
    Python package no longer ships a reader).

    The format is LevelDB's log: a 7-byte header (":W&B", magic 0xBEE1 as uint16, version
    0), then 32 KiB blocks of chunks: checksum (uint32; zlib crc32 of the type byte, then
    of the data), length (uint16), type (1 full, 2 first, 3 middle, 4 last), data; a block
    tail shorter than a chunk header is zero padding. A record is a
    ``wandb_internal_pb2.Record``, split over chunks when it crosses a block.
    """
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert len(data) >= 7 and struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, parts, out = 7, [], []
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
        if (crc, length, kind) == (0, 0, 0):
            break
        chunk = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at {pos}"
        pos += _CHUNK_HEADER + length
        parts = [chunk] if kind in (1, 2) else [*parts, chunk]
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
    assert pos == len(data), "the file ends inside a record"
    return out


def _finished_records(path, timeout=60.0):
    """The records of a run's ``.wandb`` file once it ends with the run's exit record:
    wandb-core writes the log a 32 KiB block at a time and may write the last block just
    after ``run.finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(path)
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except AssertionError:  # caught mid-write
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.1)


def wandb_run(root):
    """``(history, config, run_id)`` of the offline runs under ``root`` (one id; in order of
    their files): history ``{step: {key: value}}`` without wandb's own ``_`` keys; config
    ``{key: value}`` (the run's config records)."""
    files = sorted(glob.glob(os.path.join(root, "wandb", "offline-run-*", "run-*.wandb")))
    assert files, f"no offline run under {root}"
    history, config, ids = {}, {}, set()
    for f in files:
        for r in _finished_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
                config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                row = history.setdefault(r.history.step.num, {})
                for i in r.history.item:
                    key = i.key or "/".join(i.nested_key)
                    if not key.startswith("_"):
                        row[key] = json.loads(i.value_json)
    assert len(ids) == 1, ids
    return history, config, ids.pop()


def _as_wandb(rows):
    """JSONL rows -> the W&B history they should make: ``{step: {"split/key": value}}``."""
    out = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(
            {f"{r['split']}/{k}": v for k, v in r.items() if k not in ("step", "split")})
    return out


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline and quiet, its files under tmp_path/wandb_dir; no network."""
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    for k, v in {"WANDB_DIR": str(folder), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_MODE": "offline", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(k, v)
    return str(folder)


def _wandb_config(**wandb):
    c = mio_config.base_config()
    c.log.wandb.mode = "offline"
    c.log.wandb.project = "mio-test"
    for k, v in wandb.items():
        c.log.wandb[k] = v
    return c


def test_wandb_offline_run_logs_what_jsonl_logs(tmp_path, wandb_env):
    work = str(tmp_path / "run")
    cfg = _wandb_config(name="tiny", tags="a, b")
    w = metrics.make_writers(work, config=cfg)
    for step in range(1, 201):  # records over several 32 KiB blocks of the .wandb file
        w.write(step, {"loss": 1.0 / step, "rewards/accuracies": step % 7 / 7, "n": step})
        if step % 50 == 0:
            w.write(step, {"loss": 2.0 / step}, split="eval")
    w.close()
    rows = _jsonl(os.path.join(work, "metrics.jsonl"))
    history, config, run_id = wandb_run(wandb_env)
    assert len(history) == 200
    assert history == _as_wandb(rows)
    assert history[50] == {"train/loss": 0.02, "train/rewards/accuracies": 1 / 7,
                           "train/n": 50, "eval/loss": 0.04}
    assert config["loss"]["name"] == cfg.loss.name
    assert config["log"]["wandb"] == cfg.log.wandb.to_dict()
    assert open(os.path.join(work, "wandb_run_id")).read().strip() == run_id


def test_wandb_resume_continues_the_same_run(tmp_path, wandb_env):
    work = str(tmp_path / "run")
    w = metrics.make_writers(work, config=_wandb_config())
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    w.close()
    first = paths.read_text(os.path.join(work, "wandb_run_id")).strip()
    w = metrics.make_writers(work, resume_step=3, config=_wandb_config())
    w.write(4, {"loss": 4.0})
    w.close()
    history, _, run_id = wandb_run(wandb_env)  # two offline folders of one run id
    assert run_id == first
    assert history == {s: {"train/loss": float(s)} for s in (1, 2, 3, 4)}
    assert len(glob.glob(os.path.join(wandb_env, "wandb", "offline-run-*"))) == 2
    # a run starting from scratch (no checkpoint) starts a new W&B run
    metrics.make_writers(work, resume_step=0, config=_wandb_config()).close()
    assert paths.read_text(os.path.join(work, "wandb_run_id")).strip() != first


def test_wandb_with_a_gs_workdir_keeps_its_run_id_there(gcs, wandb_env):
    work = f"gs://{gcs.bucket}/wandb_run"
    w = metrics.make_writers(work, config=_wandb_config())
    w.write(1, {"loss": 0.5})
    w.close()
    history, _, run_id = wandb_run(wandb_env)  # wandb's own files stay on local disk
    assert history == {1: {"train/loss": 0.5}}
    assert paths.read_text(work + "/wandb_run_id").strip() == run_id


def test_wandb_disabled_creates_nothing(tmp_path):
    w = metrics.make_writers(str(tmp_path), config=mio_config.base_config())
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tb"]


@pytest.mark.parametrize("wandb, message", [
    ({"mode": "on"}, r"log.wandb.mode='on' must be one of \['disabled', 'online', 'offline'\]"),
    ({"mode": "online", "project": ""}, "log.wandb.project must be set when log.wandb.mode"),
    ({"tags": "ok," + "x" * 65}, "log.wandb.tags=.* longer than 64"),
    ({"dir": "gs://bucket/wandb"}, "log.wandb.dir='gs://bucket/wandb' must be a local folder"),
])
def test_wandb_config_errors_name_the_key(wandb, message):
    cfg = _wandb_config(**wandb)
    with pytest.raises(mio_config.ConfigError, match=message):
        metrics.validate_log_config(cfg)


def test_wandb_missing_names_the_key_and_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    metrics.validate_log_config(mio_config.base_config())  # disabled: not needed
    with pytest.raises(mio_config.ConfigError,
                       match=r"log.wandb.mode='offline' needs .* pip install 'mio_jax\[wandb\]'"):
        metrics.validate_log_config(_wandb_config())
    with pytest.raises(mio_config.ConfigError, match=r"mio_jax\[wandb\]"):
        metrics.make_writers(str(tmp_path), config=_wandb_config())


def test_trainer_logs_to_wandb_offline(tiny, tmp_path, tiny_config, wandb_env):
    from mio_jax import train

    cfg = tiny_config(*tiny, **{"train.steps": 2, "checkpoint.every_steps": 2,
                                "eval.every_steps": 0, "checkpoint.export_hf": False,
                                "log.wandb.mode": "offline", "log.wandb.project": "mio-test"})
    out = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    rows = _jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval")]
    history, config, _ = wandb_run(wandb_env)
    assert history == _as_wandb(rows)
    assert history[2]["train/loss"] == out["train"]["loss"]
    assert history[2]["eval/loss"] == out["eval"]["loss"]
    assert config["train"]["steps"] == 2 and config["log"]["wandb"]["mode"] == "offline"


def test_log_lines_print_above_the_progress_bar_on_their_own_line(capsys):
    """absl's log lines during a run never share the progress bar's terminal line."""
    handler = absl_logging.get_absl_handler().python_handler
    saved, handler.stream = handler.stream, sys.stderr  # the captured stderr
    try:
        bar = metrics.Progress(5, 0, enabled=True)
        bar.update(1, {"loss": 1.25})
        handler.stream.write("I1207 06:44:22.0 periodic.py:85] step 1: loss=1.25\n")
        bar.update(2, {"loss": 1.0})
        bar.close()
        assert handler.stream is sys.stderr  # restored
    finally:
        handler.stream = saved
    lines = capsys.readouterr().err.replace("\r", "\n").split("\n")
    logged = [line for line in lines if "step 1: loss=1.25" in line]
    assert logged == ["I1207 06:44:22.0 periodic.py:85] step 1: loss=1.25"], lines
    assert any("2/5" in line and "loss=1.0000" in line for line in lines)
