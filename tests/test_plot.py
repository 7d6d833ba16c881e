"""Curves plotted from metrics.jsonl equal the logged values."""

import json

import pytest

from mio_jax import plot


def _write(workdir, rows, config=None):
    workdir.mkdir()
    with open(workdir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if config is not None:
        (workdir / "config.json").write_text(json.dumps(config))
    return str(workdir)


@pytest.fixture
def runs(tmp_path):
    dpo = _write(tmp_path / "run_a", [
        {"step": 10, "split": "train", "loss": 0.69, "rewards/chosen": 0.0, "rewards/margins": 0.1,
         "logps/chosen": -50.0, "lr": 1e-6},
        {"step": 20, "split": "train", "loss": 0.60, "rewards/chosen": -0.2, "rewards/margins": 0.4,
         "logps/chosen": -53.5},
        {"step": 20, "split": "eval", "loss": 0.65, "rewards/chosen": -0.1,
         "probe/logps/chosen": -40.0, "probe/logratio/chosen": -0.3},
        {"step": 30, "split": "train", "loss": 0.50, "rewards/chosen": -0.5, "rewards/margins": 0.9,
         "logps/chosen": -58.0},
    ], config={"loss": {"name": "dpo", "beta": 0.1}})
    mio = _write(tmp_path / "run_b", [
        {"step": 10, "loss": 1.38, "rewards/chosen": 0.0, "eval/accuracy": 0.25},
        {"step": 30, "loss": 1.20, "rewards/chosen": 0.3, "eval/accuracy": 0.5},
    ])
    return dpo, mio


def _lines(fig):
    out = {}
    for ax in fig.axes:
        if ax.get_visible():
            for line in ax.get_lines():
                out[(ax.get_title(), line.get_label())] = (list(line.get_xdata()), list(line.get_ydata()))
    return out


def test_lines_equal_the_logged_values(runs, tmp_path):
    fig = plot.plot_runs(runs)
    lines = _lines(fig)
    assert lines == {
        ("loss", "run_a (dpo) loss"): ([10, 20, 30], [0.69, 0.60, 0.50]),
        ("loss", "run_a (dpo) eval/loss"): ([20], [0.65]),
        ("loss", "run_b loss"): ([10, 30], [1.38, 1.20]),
        ("rewards/chosen", "run_a (dpo) rewards/chosen"): ([10, 20, 30], [0.0, -0.2, -0.5]),
        ("rewards/chosen", "run_a (dpo) eval/rewards/chosen"): ([20], [-0.1]),
        ("rewards/chosen", "run_b rewards/chosen"): ([10, 30], [0.0, 0.3]),
        ("rewards/margins", "run_a (dpo) rewards/margins"): ([10, 20, 30], [0.1, 0.4, 0.9]),
        ("logps/chosen", "run_a (dpo) logps/chosen"): ([10, 20, 30], [-50.0, -53.5, -58.0]),
        ("eval accuracy", "run_b eval/accuracy"): ([10, 30], [0.25, 0.5]),
        ("probe pairs: chosen log-ratio", "run_a (dpo) eval/probe/logratio/chosen"): ([20], [-0.3]),
        ("probe pairs: logps/chosen", "run_a (dpo) eval/probe/logps/chosen"): ([20], [-40.0]),
    }
    # panels without data (rewards/rejected, rewards/accuracies) are skipped
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [
        "loss", "rewards/chosen", "rewards/margins", "logps/chosen",
        "probe pairs: chosen log-ratio", "probe pairs: logps/chosen", "eval accuracy"]
    styles = {line.get_label(): line.get_linestyle() for ax in fig.axes for line in ax.get_lines()}
    assert styles["run_a (dpo) loss"] == "-" and styles["run_a (dpo) eval/loss"] == "--"


def test_cli_writes_png(runs, tmp_path):
    out = tmp_path / "both.png"
    plot.main([*runs, f"--out={out}"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no metrics.jsonl"):
        plot.plot_runs([str(tmp_path / "empty")])
    bad = _write(tmp_path / "bad", [{"step": 1, "loss": 1.0}])
    with open(f"{bad}/metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl:2: not valid JSON"):
        plot.read_metrics(bad)
    other = _write(tmp_path / "other", [{"step": 1, "lr": 0.1}])
    with pytest.raises(ValueError, match="no plottable metrics"):
        plot.plot_runs([other])
