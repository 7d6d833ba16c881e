"""Training curves of one or several runs from their `metrics.jsonl`, on one figure (the
positional arguments are the runs' workdirs).

    python -m mio_jax.plot WORKDIR [WORKDIR ...] [--out=FILE.png]

Panels (each skipped when no run has data for it): loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, the probe pairs' chosen and rejected
log-ratios and logps/chosen (``eval.probe_path``), and the evaluation accuracy (any key
holding "accuracy" other than rewards/accuracies, e.g. `eval/accuracy`). Train rows are solid
lines; rows of another split (`"split": "eval"` as `mio_jax.metrics.JsonlWriter` writes them, or
keys already prefixed "eval/") are dashed. The legend names each run by its workdir and, when
`WORKDIR/config.json` exists, its `loss.name`. Workdirs and `--out` are local paths or URLs
such as `gs://bucket/run` (`mio_jax.paths`).

    python -m mio_jax.plot --rounds WORKDIR [WORKDIR ...] [--out=FILE.png]

draws the per-round panels of online runs (`mio_jax.online`, rows of split "round"): the
samples' pass rate, the fraction of prompts with signal, all-correct and none-correct
counts, answer length, the round's rows' chosen log-ratio and logps/chosen after its
training, and the held-out accuracy with its 95 % interval at the rounds it was measured.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Sequence

from absl import flags

from mio_jax import cli, errors, paths
from mio_jax.data.sources import iter_jsonl

PANELS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "probe/logratio/chosen", "probe/logratio/rejected",
          "probe/logps/chosen")
# the probe pairs' panels (``eval.probe_path``: held-out pairs never trained on)
TITLES = {"probe/logratio/chosen": "probe pairs: chosen log-ratio",
          "probe/logratio/rejected": "probe pairs: rejected log-ratio",
          "probe/logps/chosen": "probe pairs: logps/chosen"}
EVAL_ACCURACY = "eval accuracy"

Series = dict[str, tuple[list[int], list[float]]]  # key -> (steps, values)

FLAGS = flags.FlagValues()
flags.DEFINE_bool("rounds", False, "per-round panels of online runs", flag_values=FLAGS)
flags.DEFINE_string("out", "", "PNG path (default: WORKDIR/curves.png, or rounds.png with "
                    "--rounds, of the first run)", flag_values=FLAGS)


def read_metrics(workdir: str) -> Series:
    """Series of `workdir/metrics.jsonl`: key (prefixed "<split>/" for non-train rows) -> (steps, values).

    Raises:
      FileNotFoundError: no metrics.jsonl in `workdir`.
      ValueError: a line that is not a JSON object with an integer `step` (names file and line).
    """
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.isfile(path):
        raise FileNotFoundError(f"{workdir}: no metrics.jsonl (is this a mio_jax training workdir?)")

    series: Series = {}
    for line_no, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{line_no}: expected an object with an integer 'step'")
        split = row.get("split", "train")
        for key, value in row.items():
            if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if split != "train" and not key.startswith(f"{split}/"):
                key = f"{split}/{key}"
            steps, values = series.setdefault(key, ([], []))
            steps.append(row["step"])
            values.append(float(value))
    return series


def run_label(workdir: str) -> str:
    """The legend name of a run: the workdir's name, plus its loss from config.json if present."""
    name = paths.basename(workdir if paths.is_remote(workdir) else os.path.normpath(workdir))
    cfg_path = paths.join(workdir, "config.json")
    if paths.isfile(cfg_path):
        loss = (paths.read_json(cfg_path).get("loss") or {}).get("name")
        if loss and loss not in name:
            name = f"{name} ({loss})"
    return name


def panel_keys(series: Series, panel: str) -> list[str]:
    """The series drawn in `panel`: the train key and its "<split>/" variants, or the eval
    accuracy keys."""
    if panel == EVAL_ACCURACY:
        return sorted(k for k in series if "accuracy" in k and not k.endswith("rewards/accuracies"))
    return sorted(k for k in series if k == panel or (k.endswith("/" + panel) and k.count("/") == panel.count("/") + 1))


ROUND_PANELS = ("pass_rate", "signal_fraction", "all_correct", "none_correct",
                "answer_tokens_mean", "chosen_logratio", "logps_chosen", "rows")
HELD_OUT = "reasoning/accuracy"


def round_series(series: Series) -> dict[str, tuple[list[int], list[float]]]:
    """Per-round values of an online run: ``ROUND_PANELS`` keys -> (rounds, values), and the
    held-out accuracy with its interval -> (rounds, [(accuracy, low, high)]); the held-out
    eval at step 0 is round -1 (before the first round)."""
    if "round/round" not in series:
        return {}
    steps, rounds = series["round/round"]
    at = dict(zip(steps, (int(r) for r in rounds)))
    out = {}
    for key in ROUND_PANELS:
        if f"round/{key}" in series:
            st, vals = series[f"round/{key}"]
            out[key] = ([at[s] for s in st], vals)
    acc = series.get(f"eval/{HELD_OUT}")
    if acc:
        low = dict(zip(*series["eval/reasoning/ci95_low"]))
        high = dict(zip(*series["eval/reasoning/ci95_high"]))
        pts = [(at.get(s, -1 if s == 0 else None), (v, low[s], high[s]))
               for s, v in zip(*acc)]
        pts = [(r, v) for r, v in pts if r is not None]
        out[HELD_OUT] = ([r for r, _ in pts], [v for _, v in pts])
    return out


def panel_grid(n: int, height: float):
    """A figure of ``n`` panels, 3 per row: ``(fig, axes, colors)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, height * rows), squeeze=False)
    return fig, list(axes.flat), plt.rcParams["axes.prop_cycle"].by_key()["color"]


def finish_panels(fig, axes, n: int, xlabel: str):
    """Labels, grids and legends of the first ``n`` panels; the rest hidden."""
    for ax in axes[:n]:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def accuracy_errorbar(ax, x, points, **style):
    """Draws accuracies with their intervals: ``points`` are ``(accuracy, low, high)``."""
    acc = [v[0] for v in points]
    err = [[v[0] - v[1] for v in points], [v[2] - v[0] for v in points]]
    ax.errorbar(x, acc, yerr=err, marker="o", capsize=3, **style)


def plot_rounds(workdirs: Sequence[str], labels: Sequence[str] | None = None):
    """The per-round panels of online runs (see the module docstring); returns the Figure.

    Raises:
      ValueError: none of the runs has per-round rows.
    """
    runs = [round_series(read_metrics(w)) for w in workdirs]
    labels = list(labels) if labels else [run_label(w) for w in workdirs]
    panels = [p for p in ROUND_PANELS + (HELD_OUT,) if any(p in r for r in runs)]
    if not panels:
        raise ValueError(f"no per-round rows (split 'round') in {list(workdirs)}: "
                         "are these online runs (online.enabled)?")
    fig, axes, colors = panel_grid(len(panels), 3.4)
    for ax, panel in zip(axes, panels):
        for i, (run, label) in enumerate(zip(runs, labels)):
            if panel not in run:
                continue
            x, y = run[panel]
            color = colors[i % len(colors)]
            if panel == HELD_OUT:
                accuracy_errorbar(ax, x, y, color=color, label=label)
            else:
                ax.plot(x, y, color=color, marker="o", label=label)
        ax.set_title("held-out accuracy (95% CI)" if panel == HELD_OUT else panel)
    return finish_panels(fig, axes, len(panels), "round")


def plot_runs(workdirs: Sequence[str], labels: Sequence[str] | None = None):
    """Draws the standard panels for the runs in `workdirs`.

    Args:
      workdirs: training workdirs, each with a metrics.jsonl.
      labels: legend names (default: `run_label` of each).

    Returns:
      the matplotlib Figure; each line's label is "<run> <key>" and its data the steps/values read.
    """
    runs = [read_metrics(w) for w in workdirs]
    labels = list(labels) if labels else [run_label(w) for w in workdirs]
    panels = [p for p in PANELS + (EVAL_ACCURACY,) if any(panel_keys(s, p) for s in runs)]
    if not panels:
        raise ValueError(f"no plottable metrics ({', '.join(PANELS)}, eval accuracy) in {list(workdirs)}")
    fig, axes, colors = panel_grid(len(panels), 3.6)
    for ax, panel in zip(axes, panels):
        for r, (series, label) in enumerate(zip(runs, labels)):
            for key in panel_keys(series, panel):
                steps, values = series[key]
                train = key == panel or (panel == EVAL_ACCURACY and not key.startswith("eval"))
                ax.plot(steps, values, color=colors[r % len(colors)], ls="-" if train else "--",
                        marker="." if len(steps) < 30 else None, label=f"{label} {key}")
        ax.set_title(TITLES.get(panel, panel))
    return finish_panels(fig, axes, len(panels), "step")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mio_jax.plot WORKDIR [WORKDIR ...]`` (the ``mio-plot`` command; see the
    module docstring); ``argv``: the arguments after the program name (default: the command
    line's)."""
    cli.run(_plot, FLAGS, __doc__, argv)


def _plot(workdirs: list[str]) -> None:
    """Draws the runs in ``workdirs`` with the parsed flags."""
    if not workdirs:
        errors.fail("expected at least one WORKDIR (a training workdir with metrics.jsonl)")
    out = FLAGS.out or paths.join(workdirs[0], "rounds.png" if FLAGS.rounds else "curves.png")
    with errors.input_errors_in_one_line():  # a missing or damaged metrics file: one line
        fig = (plot_rounds if FLAGS.rounds else plot_runs)(workdirs)
        save_figure(fig, out)
    print(f"wrote {out}")


def save_figure(fig, out: str, dpi: int = 110) -> None:
    """Saves ``fig`` as a PNG at ``out``: a local file, or a URL (written to a local
    temporary file, then uploaded)."""
    if not paths.is_remote(out):
        fig.savefig(out, dpi=dpi)
        return
    fd, local = tempfile.mkstemp(prefix="mio_plot_", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(local, dpi=dpi)
        paths.upload(local, out)
    finally:
        os.remove(local)


if __name__ == "__main__":
    main()
