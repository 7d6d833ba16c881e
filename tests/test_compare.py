"""The paired comparison command on a made-up study: per-problem verdicts of two methods
over paired seeds, and a base model's evaluation."""

import json
import os

import numpy as np
import pytest

from mio_jax import compare, paired

QUESTIONS = [f"q{i}" for i in range(6)]
# method -> seed -> greedy verdict per problem
GREEDY = {
    "mio": {0: [1, 1, 1, 0, 1, 0], 1: [1, 1, 0, 0, 1, 1]},
    "dpo": {0: [1, 0, 0, 0, 1, 0], 1: [0, 1, 0, 0, 1, 0]},
}
BASE = [1, 0, 0, 0, 0, 0]


def _report(verdicts, samples=1):
    rows = [{"task": "t", "question": q, "answer": "1", "completions": ["x"] * samples,
             "correct": [bool(v)] + [bool(v) and k % 2 == 0 for k in range(1, samples)]}
            for q, v in zip(QUESTIONS, verdicts)]
    return {"tasks": {}, "overall": {}, "completions": rows}


@pytest.fixture
def study(tmp_path):
    runs = tmp_path / "runs"
    for method, seeds in GREEDY.items():
        for seed, verdicts in seeds.items():
            folder = runs / f"{method}_seed{seed}" / "reasoning_eval"
            folder.mkdir(parents=True)
            for step, v in ((0, BASE), (8, verdicts)):  # --eval=last takes step 8
                (folder / f"step_{step}.json").write_text(json.dumps(_report(v, samples=3)))
    (tmp_path / "base.json").write_text(json.dumps({"results": {"t": _report(BASE, 3)}}))
    return tmp_path


def test_methods_are_compared_per_seed_and_per_problem(study):
    rows = compare.compare(compare.load_study(str(study / "runs"), "last"), "dpo",
                           num_resamples=2000)
    assert [r["method"] for r in rows] == ["mio"] and rows[0]["seeds"] == [0, 1]
    g = rows[0]["greedy"]
    a = np.array([GREEDY["mio"][0], GREEDY["mio"][1]], bool)
    b = np.array([GREEDY["dpo"][0], GREEDY["dpo"][1]], bool)
    # cells where only mio is right: seed 0 q1, q2; seed 1 q0, q5 -> 4; only dpo: none
    assert (g["mcnemar_only_method"], g["mcnemar_only_baseline"]) == (4, 0)
    assert g["mcnemar_p"] == pytest.approx(2 / 16)
    assert g["accuracy"] == pytest.approx(a.mean()) and g["baseline_accuracy"] == b.mean()
    t = paired.paired_t(a.mean(axis=1), b.mean(axis=1))
    assert g["difference"] == pytest.approx(4 / 12) and g["t_ci95"] == [t.low, t.high]
    assert g["bootstrap_ci95"][0] <= 4 / 12 <= g["bootstrap_ci95"][1]
    # three samples per problem: the sampled pass@1 is compared too (no McNemar)
    assert "mcnemar_p" not in rows[0]["sampled"]


def test_runs_in_several_folders_form_one_study(study, tmp_path):
    """A sweep keeps each chosen cell's runs in its own folder: several --runs folders."""
    cells = tmp_path / "cells"
    for method in GREEDY:
        (cells / method).mkdir(parents=True)
        for seed in GREEDY[method]:
            os.rename(study / "runs" / f"{method}_seed{seed}",
                      cells / method / f"{method}_seed{seed}")
    one = compare.compare(compare.load_study([str(cells / "mio"), str(cells / "dpo")], "last"),
                          "dpo", num_resamples=200)
    assert one[0]["greedy"]["mcnemar_only_method"] == 4
    with pytest.raises(compare.InputError, match="already in another --runs folder"):
        compare.load_study([str(cells / "mio"), str(cells / "mio")], "last")


def test_the_base_model_is_every_seeds_baseline(study):
    study_data = compare.load_study(str(study / "runs"), "last", str(study / "base.json"))
    rows = {r["method"]: r for r in compare.compare(study_data, "base", num_resamples=500)}
    assert sorted(rows) == ["dpo", "mio"] and rows["mio"]["seeds"] == [0, 1]
    assert rows["dpo"]["greedy"]["baseline_accuracy"] == pytest.approx(1 / 6)


def test_the_command_prints_and_writes_the_table(study, capsys):
    out = study / "comparison.json"
    compare.main([f"--runs={study / 'runs'}", "--baseline=dpo", f"--out={out}",
                  "--num_resamples=200"])
    printed = capsys.readouterr().out
    assert "| mio | dpo | 2 | 6 | greedy | 66.7 | 33.3 |  33.3 |" in printed
    assert json.load(open(out))[0]["method"] == "mio"


def test_evaluations_without_verdicts_or_of_other_problems_are_refused(study, tmp_path):
    old = _report(BASE)
    for row in old["completions"]:
        del row["correct"]
    with pytest.raises(compare.InputError, match="no 'correct' verdicts"):
        compare.outcomes_of(old, "old.json")
    other = study / "runs" / "dpo_seed1" / "reasoning_eval" / "step_8.json"
    report = json.load(open(other))
    report["completions"][0]["question"] = "another"
    other.write_text(json.dumps(report))
    with pytest.raises(compare.InputError, match="other problems"):
        compare.compare(compare.load_study(str(study / "runs"), "last"), "dpo")
    with pytest.raises(compare.InputError, match="the methods are"):
        compare.compare(compare.load_study(str(study / "runs"), "last"), "sft")
    assert os.path.isdir(study / "runs")
