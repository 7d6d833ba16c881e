"""A hyper-parameter sweep: a grid of (learning rate, beta) per method, each cell trained at
its seeds, the best cell of each method chosen on the validation split, and only that cell
evaluated once on the test split.

    python -m mio_jax.sweep --config=configs/online.py --methods=mio,dpo \
        --learning_rates=5e-7,1e-6,2e-6 --betas=0.1,0.5 --select_seeds=0 \
        --test_seeds=0,1,2 --out=workdirs/sweep --task=basic_arithmetic \
        --set=online.rounds=4

Each run is ``python -m mio_jax.main --config=CONFIG:METHOD`` with
``--config.optim.learning_rate``, ``--config.loss.beta`` and ``--config.seed`` set (and every
``--set``), in its own process and its own work folder
``OUT/<method>_lr<lr>_beta<beta>/<method>_seed<k>``. A run's validation score is the last
eval row's ``--select_metric`` in its ``metrics.jsonl`` (the trainer's held-out evals use the
validation split). The test evaluation is ``python -m mio_jax.evaluate --split=test`` on the
run's export (``hf_export``: merged weights, LoRA runs included), on the same test problems
for every seed (evaluation seed 0), so that ``mio_jax.compare`` pairs them by problem.
Everything is resumable: a finished run (``sweep_run.json``) and a written test evaluation
are kept, an interrupted run resumes from its own checkpoints, and a rerun of the same
command goes on where it stopped. ``OUT/sweep.json`` and ``OUT/sweep.md`` (``--table``) hold
the table: every cell's validation score, the cell chosen per method, its test accuracy per
seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags

from mio_jax import cli, errors, paths
from mio_jax.errors import InputError

FLAGS = flags.FlagValues()
flags.DEFINE_string("config", None, "experiment file whose get_config(METHOD) builds a run",
                    flag_values=FLAGS, required=True)
flags.DEFINE_list("methods", None, "methods (the config file's arg)", flag_values=FLAGS,
                  required=True)
flags.DEFINE_list("learning_rates", None, "peak learning rates of the grid", flag_values=FLAGS,
                  required=True)
flags.DEFINE_list("betas", None, "betas of the grid", flag_values=FLAGS, required=True)
flags.DEFINE_list("select_seeds", ["0"], "seeds every cell runs (selection on validation)",
                  flag_values=FLAGS)
flags.DEFINE_list("test_seeds", ["0", "1", "2"], "seeds the chosen cell runs and evaluates "
                  "on test", flag_values=FLAGS)
flags.DEFINE_string("select_metric", "reasoning/accuracy", "eval metric that picks the cell",
                    flag_values=FLAGS)
flags.DEFINE_enum("select_mode", "max", ["max", "min"], "best is the largest or smallest",
                  flag_values=FLAGS)
flags.DEFINE_multi_string("set", [], "KEY=VALUE config override of every run (repeatable)",
                          flag_values=FLAGS)
flags.DEFINE_multi_string("task", [], "test tasks (reasoning-gym; repeatable)", flag_values=FLAGS)
flags.DEFINE_string("task_config", "", "JSON kwargs of the test tasks", flag_values=FLAGS)
flags.DEFINE_integer("test_examples", 1000, "test problems per task", flag_values=FLAGS)
flags.DEFINE_integer("test_samples", 1, "sampled completions per test problem (besides "
                     "greedy: > 1 samples at --test_temperature)", flag_values=FLAGS)
flags.DEFINE_float("test_temperature", 0.0, "test sampling temperature", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 96, "longest test answer", flag_values=FLAGS)
flags.DEFINE_string("out", None, "the sweep's folder", flag_values=FLAGS, required=True)
flags.DEFINE_string("table", "sweep", "the table's file name in --out (NAME.json, NAME.md): "
                    "sweeps that share their runs keep their own tables", flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid point of one method."""

    method: str
    learning_rate: float
    beta: float

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.learning_rate:g}_beta{self.beta:g}"

    def run_dir(self, out: str, seed: int) -> str:
        return os.path.join(out, self.name, f"{self.method}_seed{seed}")


# (cell, seed, work folder) -> the run's validation score; (cell, seed, work folder) -> the
# test evaluation's accuracy
Runner = Callable[[Cell, int, str], float]
Evaluator = Callable[[Cell, int, str], float]


def grid(methods: Sequence[str], learning_rates: Sequence[float],
         betas: Sequence[float]) -> list[Cell]:
    """Every (method, learning rate, beta) cell, in that order."""
    return [Cell(m, float(lr), float(b)) for m in methods for lr in learning_rates for b in betas]


def select(scores: Mapping[Cell, Sequence[float]], mode: str = "max") -> dict[str, Cell]:
    """The best cell of each method by its mean validation score (ties: the first cell)."""
    best: dict[str, tuple[float, Cell]] = {}
    for cell, values in scores.items():
        mean = sum(values) / len(values)
        key = mean if mode == "max" else -mean
        if cell.method not in best or key > best[cell.method][0]:
            best[cell.method] = (key, cell)
    return {m: c for m, (_, c) in best.items()}


def _cached(path: str, compute: Callable[[], float]) -> float:
    """The value stored at ``path`` (a finished piece of the sweep), else computed and
    stored."""
    if os.path.isfile(path):
        return float(paths.read_json(path)["value"])
    value = float(compute())
    paths.write_json(path, {"value": value})
    return value


def run_sweep(cells: Sequence[Cell], *, out: str, select_seeds: Sequence[int],
              test_seeds: Sequence[int], runner: Runner, evaluator: Evaluator,
              mode: str = "max") -> dict[str, Any]:
    """Trains every cell at ``select_seeds``, picks each method's best cell, trains it at
    the other ``test_seeds`` and evaluates it on test at every test seed.

    Returns:
      ``{"cells": [{"cell", "validation": {seed: score}, "mean"}], "chosen": {method:
      {"cell", "validation", "test": {seed: accuracy}, "test_mean"}}}``.
    """
    scores: dict[Cell, list[float]] = {}
    table = []
    for cell in cells:
        per_seed = {}
        for seed in select_seeds:
            work = cell.run_dir(out, seed)
            per_seed[seed] = _cached(os.path.join(work, "sweep_run.json"),
                                     lambda: runner(cell, seed, work))
        scores[cell] = list(per_seed.values())
        table.append({"cell": cell.name, "validation": per_seed,
                      "mean": sum(per_seed.values()) / len(per_seed)})
    chosen = {}
    for method, cell in select(scores, mode).items():
        test = {}
        for seed in test_seeds:
            work = cell.run_dir(out, seed)
            _cached(os.path.join(work, "sweep_run.json"), lambda: runner(cell, seed, work))
            test[seed] = _cached(os.path.join(work, "sweep_test.json"),
                                 lambda: evaluator(cell, seed, work))
        chosen[method] = {"cell": cell.name, "validation": sum(scores[cell]) / len(scores[cell]),
                          "test": test, "test_mean": sum(test.values()) / len(test)}
    return {"cells": table, "chosen": chosen}


def format_table(result: Mapping[str, Any]) -> str:
    """The sweep's Markdown table: the grid on validation, then the chosen cells on test."""
    lines = ["| cell | validation (per seed) | mean |", "|---|---|---|"]
    for row in result["cells"]:
        seeds = ", ".join(f"{s}: {v:.4g}" for s, v in row["validation"].items())
        lines.append(f"| {row['cell']} | {seeds} | {row['mean']:.4g} |")
    lines += ["", "| method | chosen cell | validation | test (per seed) | test mean |",
              "|---|---|---|---|---|"]
    for method, c in sorted(result["chosen"].items()):
        seeds = ", ".join(f"{s}: {v:.4g}" for s, v in c["test"].items())
        lines.append(f"| {method} | {c['cell']} | {c['validation']:.4g} | {seeds} | "
                     f"{c['test_mean']:.4g} |")
    return "\n".join(lines)


def last_eval_metric(workdir: str, metric: str) -> float:
    """``metric`` of the last eval row of a run's ``metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    evals = [r for r in rows if r.get("split") == "eval" and metric in r]
    if not evals:
        raise InputError(f"{path}: no eval row with {metric!r} (--select_metric)")
    return float(evals[-1][metric])


def _subprocess(args: list[str], log: str) -> None:
    """Runs a command, its output appended to ``log``; stops the sweep naming the log when
    the command fails (its work folder is kept: a rerun resumes it)."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        code = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise InputError(f"{' '.join(args[:4])} ... exited with status {code}; see {log}")


def _main_runner(config: str, overrides: Sequence[str], metric: str) -> Runner:
    def run(cell: Cell, seed: int, work: str) -> float:
        args = [sys.executable, "-m", "mio_jax.main", f"--config={config}:{cell.method}",
                f"--workdir={work}", f"--config.optim.learning_rate={cell.learning_rate!r}",
                f"--config.loss.beta={cell.beta!r}", f"--config.seed={seed}",
                *[f"--config.{kv}" for kv in overrides]]
        _subprocess(args, work + ".log")
        return last_eval_metric(work, metric)
    return run


def _test_evaluator(args: flags.FlagValues) -> Evaluator:
    def evaluate(cell: Cell, seed: int, work: str) -> float:
        out = os.path.join(work, "test_eval.json")
        command = [sys.executable, "-m", "mio_jax.evaluate", "--split=test",
                   f"--model={os.path.join(work, 'hf_export')}", f"--out={out}",
                   f"--num_examples={args.test_examples}", "--seed=0",
                   f"--max_new_tokens={args.max_new_tokens}",
                   *[f"--task={t}" for t in args.task]]
        if args.task_config:
            command.append(f"--task_config={args.task_config}")
        if args.test_samples > 1:
            command += [f"--samples={args.test_samples}",
                        f"--temperature={args.test_temperature}"]
        _subprocess(command, out + ".log")
        report = paths.read_json(out)
        totals = [r["overall"] for r in report["results"].values()]
        return sum(t["correct"] for t in totals) / sum(t["n"] for t in totals)
    return evaluate


def _sweep(argv: list[str]) -> None:
    cli.expect_no_arguments(argv)
    a = FLAGS
    if not a.task:
        errors.fail("give the test tasks: --task=NAME (repeatable)")
    for kv in a.set:
        if "=" not in kv:
            errors.fail(f"--set={kv!r}: expected KEY=VALUE")
    with errors.input_errors_in_one_line():
        try:
            lrs = [float(x) for x in a.learning_rates]
            betas = [float(x) for x in a.betas]
            select_seeds = [int(x) for x in a.select_seeds]
            test_seeds = [int(x) for x in a.test_seeds]
        except ValueError as e:
            raise InputError(f"a grid value is not a number: {e}") from e
        result = run_sweep(grid(a.methods, lrs, betas), out=a.out, select_seeds=select_seeds,
                           test_seeds=test_seeds,
                           runner=_main_runner(a.config, a.set, a.select_metric),
                           evaluator=_test_evaluator(a), mode=a.select_mode)
    paths.write_json(os.path.join(a.out, f"{a.table}.json"), result, indent=1)
    table = format_table(result)
    runs = " ".join(f"--runs={os.path.join(a.out, c['cell'])}"
                    for _, c in sorted(result["chosen"].items()))
    table += (f"\n\nThe paired comparison of the chosen cells on test:\n\n    python -m "
              f"mio_jax.compare {runs} --eval=test_eval.json --baseline={a.methods[-1]}")
    with open(os.path.join(a.out, f"{a.table}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mio_jax.sweep``; ``argv``: the arguments after the program name."""
    return cli.run(_sweep, FLAGS, __doc__, argv)


if __name__ == "__main__":
    main()
