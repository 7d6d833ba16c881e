"""FLOP accounting, peak table, writers (JSONL, TensorBoard), NaN guard, throughput."""

import json
import time

import pytest

from mio_jax import metrics


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


def test_resume_drops_rows_after_the_restored_step(tmp_path):
    w = metrics.make_writers(str(tmp_path))
    for s in (1, 2, 3, 4):
        w.write(s, {"loss": float(s)})
    w.close()
    w = metrics.make_writers(str(tmp_path), resume_step=2)
    w.write(3, {"loss": 30.0})
    w.close()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
