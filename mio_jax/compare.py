"""Paired comparison of methods from their held-out evaluations, per problem and per seed.

    python -m mio_jax.compare --runs=STUDY/runs --eval=last --baseline=dpo \
        [--base=STUDY/base_eval.json] [--out=STUDY/comparison.json]
    python -m mio_jax.compare --runs=SWEEP/mio_lr1e-06_beta0.1 \
        --runs=SWEEP/dpo_lr5e-07_beta0.1 --eval=test_eval.json --baseline=dpo

A study's run folders are named ``<method>_seed<k>``, in one or several ``--runs`` folders
(a sweep keeps each cell's runs in the cell's folder); ``--eval`` is the evaluation file
inside each (``last``: the newest ``reasoning_eval/step_<N>.json``, or a path such as
``test_eval.json``). Every evaluation must hold the same problems in the same order, each
with the verdict of every completion (``completions[i].correct``, written by
``mio_jax.evaluate``). Each method is compared with ``--baseline`` on the seeds both ran
(``--base``: one evaluation of the base model, the same for every seed), on greedy accuracy
(the first completion) and, where there are several samples, on the sampled pass@1 (the
fraction of correct samples): the paired t test over seeds, the paired bootstrap over
problems and, for greedy outcomes, the exact McNemar test (``mio_jax.paired``).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags

from mio_jax import cli, errors, paired, paths
from mio_jax.errors import InputError

RUN_NAME = re.compile(r"(?P<method>.+)_seed(?P<seed>\d+)$")

FLAGS = flags.FlagValues()
flags.DEFINE_multi_string("runs", None, "folder of <method>_seed<k> run folders (repeatable)",
                          flag_values=FLAGS, required=True)
flags.DEFINE_string("eval", "last", "evaluation file inside each run ('last': the newest "
                    "reasoning_eval/step_<N>.json)", flag_values=FLAGS)
flags.DEFINE_string("baseline", None, "the method every other is compared with ('base' for "
                    "--base)", flag_values=FLAGS, required=True)
flags.DEFINE_string("base", "", "evaluation of the base model (method 'base', every seed)",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_resamples", 10000, "bootstrap resamples", flag_values=FLAGS)
flags.DEFINE_string("out", "", "also write the comparison as JSON here", flag_values=FLAGS)


class Outcomes:
    """One evaluation's per-problem verdicts: ``greedy [P]`` (the first completion) and
    ``sampled [P]`` (fraction of correct completions), problems identified by ``keys``."""

    def __init__(self, keys: list[tuple[str, str]], verdicts: list[list[bool]], where: str):
        self.keys, self.where = keys, where
        self.greedy = np.asarray([v[0] for v in verdicts], bool)
        self.sampled = np.asarray([np.mean(v) for v in verdicts], np.float64)
        self.samples = min(len(v) for v in verdicts)


def _results(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The evaluation results in a file: a trainer's reasoning eval is one result; the
    evaluate command's report holds one per task source under ``results``."""
    if "results" in report:
        return sorted(report["results"].items())
    return [("", report)]


def outcomes_of(report: Mapping[str, Any], where: str) -> Outcomes:
    """The per-problem verdicts of an evaluation report (``where`` names it in errors)."""
    keys, verdicts = [], []
    for name, result in _results(report):
        for i, row in enumerate(result.get("completions") or []):
            if "correct" not in row:
                raise InputError(f"{where}: completions[{i}] has no 'correct' verdicts (an "
                                 "evaluation written before per-problem outcomes were stored: "
                                 "evaluate the model again)")
            keys.append((str(row.get("task") or name), str(row["question"])))
            verdicts.append([bool(v) for v in row["correct"]])
    if not keys:
        raise InputError(f"{where}: no per-problem completions")
    return Outcomes(keys, verdicts, where)


def _eval_path(run_dir: str, which: str) -> str:
    if which != "last":
        return os.path.join(run_dir, which)
    found = glob.glob(os.path.join(run_dir, "reasoning_eval", "step_*.json"))
    if not found:
        raise InputError(f"{run_dir}: no reasoning_eval/step_<N>.json (--eval=last)")
    return max(found, key=lambda p: int(re.findall(r"step_(\d+)\.json$", p)[0]))


def load_study(runs: str | Sequence[str], which: str,
               base: str = "") -> dict[str, dict[int, Outcomes]]:
    """method -> seed -> outcomes of every ``<method>_seed<k>`` folder under the folder(s)
    ``runs`` (and ``base`` as method "base", its seed -1 standing for every seed)."""
    study: dict[str, dict[int, Outcomes]] = {}
    for folder in [runs] if isinstance(runs, str) else runs:
        for name in sorted(os.listdir(folder)):
            match = RUN_NAME.match(name)
            if not (match and os.path.isdir(os.path.join(folder, name))):
                continue
            method, seed = match["method"], int(match["seed"])
            if seed in study.get(method, {}):
                raise InputError(f"{os.path.join(folder, name)}: {method} seed {seed} is "
                                 "already in another --runs folder")
            path = _eval_path(os.path.join(folder, name), which)
            study.setdefault(method, {})[seed] = outcomes_of(paths.read_json(path), path)
    if base:
        study["base"] = {-1: outcomes_of(paths.read_json(base), base)}
    if not study:
        raise InputError(f"{runs}: no <method>_seed<k> run folders")
    return study


def _paired_seeds(a: Mapping[int, Outcomes], b: Mapping[int, Outcomes]) -> list[int]:
    if -1 in b:  # the base model: one evaluation for every seed
        return sorted(a)
    if -1 in a:
        return sorted(b)
    return sorted(set(a) & set(b))


def _pick(runs: Mapping[int, Outcomes], seed: int) -> Outcomes:
    return runs[-1] if -1 in runs else runs[seed]


def compare(study: Mapping[str, Mapping[int, Outcomes]], baseline: str, *,
            num_resamples: int = 10000) -> list[dict[str, Any]]:
    """One row per method other than ``baseline``: its accuracy and the baseline's on their
    paired seeds, the differences with paired t, bootstrap and McNemar statistics.

    Raises:
      InputError: an unknown baseline, no paired seed, or evaluations of other problems.
    """
    if baseline not in study:
        raise InputError(f"--baseline={baseline!r}: the methods are {sorted(study)}")
    rows = []
    for method in sorted(m for m in study if m != baseline):
        seeds = _paired_seeds(study[method], study[baseline])
        if not seeds:
            raise InputError(f"{method} and {baseline} share no seed")
        a = [_pick(study[method], s) for s in seeds]
        b = [_pick(study[baseline], s) for s in seeds]
        for x in a + b:
            if x.keys != a[0].keys:
                raise InputError(f"{x.where} holds other problems (or another order) than "
                                 f"{a[0].where}: a paired comparison needs the same problems")
        row: dict[str, Any] = {"method": method, "baseline": baseline, "seeds": seeds,
                               "problems": len(a[0].keys)}
        for kind in ("greedy", "sampled"):
            if kind == "sampled" and min(x.samples for x in a + b) < 2:
                continue
            va = np.stack([getattr(x, kind) for x in a]).astype(np.float64)
            vb = np.stack([getattr(x, kind) for x in b]).astype(np.float64)
            t = paired.paired_t(va.mean(axis=1), vb.mean(axis=1))
            boot = paired.paired_bootstrap(va, vb, num_resamples=num_resamples)
            row[kind] = {"accuracy": float(va.mean()), "baseline_accuracy": float(vb.mean()),
                         "difference": t.mean, "t_ci95": [t.low, t.high], "t_p": t.p_value,
                         "bootstrap_ci95": [boot.low, boot.high]}
            if kind == "greedy":
                mc = paired.mcnemar(va.astype(bool), vb.astype(bool))
                row[kind].update(mcnemar_only_method=mc.a_only, mcnemar_only_baseline=mc.b_only,
                                 mcnemar_p=mc.p_value)
        rows.append(row)
    return rows


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of ``compare``'s rows (percentage points)."""
    lines = ["| method | vs | seeds | problems | outcome | accuracy | baseline | difference "
             "| t 95% CI | t p | bootstrap 95% CI | McNemar (+/-) | McNemar p |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    for r in rows:
        for kind in ("greedy", "sampled"):
            if kind not in r:
                continue
            s = r[kind]
            mc = (f"{s['mcnemar_only_method']}/{s['mcnemar_only_baseline']} | "
                  f"{s['mcnemar_p']:.3g}" if kind == "greedy" else "- | -")
            lines.append(
                f"| {r['method']} | {r['baseline']} | {len(r['seeds'])} | {r['problems']} | "
                f"{kind} | {pct(s['accuracy'])} | {pct(s['baseline_accuracy'])} | "
                f"{pct(s['difference']):>5} | [{pct(s['t_ci95'][0])}, {pct(s['t_ci95'][1])}] | "
                f"{s['t_p']:.3g} | [{pct(s['bootstrap_ci95'][0])}, "
                f"{pct(s['bootstrap_ci95'][1])}] | {mc} |")
    return "\n".join(lines)


def _compare(args: list[str]) -> None:
    cli.expect_no_arguments(args)
    with errors.input_errors_in_one_line():
        study = load_study(FLAGS.runs, FLAGS.eval, FLAGS.base)
        rows = compare(study, FLAGS.baseline, num_resamples=FLAGS.num_resamples)
    print(format_rows(rows))
    if FLAGS.out:
        paths.write_json(FLAGS.out, rows, indent=1)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mio_jax.compare``; ``argv``: the arguments after the program name."""
    return cli.run(_compare, FLAGS, __doc__, argv)


if __name__ == "__main__":
    main()
