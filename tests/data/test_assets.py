"""The committed reasoning preference set: counts, disjoint splits, verified answers."""

import gzip
import json
import re

import pytest

from mio_jax.data import build_reasoning_prefs, pipeline
from mio_jax.data.config import default_data_config


def _rows(split):
    with gzip.open(pipeline.EMBEDDED[split], "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _answer(messages):
    return re.fullmatch(r"(?s).*\nThe answer is (-?[0-9.]+)\.", messages[0]["content"]).group(1)


def test_counts_and_disjoint_splits():
    train, evals = _rows("train"), _rows("eval")
    assert len(train) == 3000 and len(evals) == 300
    for rows, n in ((train, 1000), (evals, 100)):
        tasks = [r["task"] for r in rows]
        assert {t: tasks.count(t) for t in set(tasks)} == dict.fromkeys(
            build_reasoning_prefs.TASKS, n
        )
        questions = [r["prompt"][1]["content"] for r in rows]
        assert len(set(questions)) == len(rows)
        for r in rows:
            assert r["prompt"][0]["role"] == "system" and r["prompt"][1]["role"] == "user"
            assert _answer(r["chosen"]) == r["answer"] != _answer(r["rejected"])
    assert not {r["prompt"][1]["content"] for r in train} & {
        r["prompt"][1]["content"] for r in evals
    }


def test_generator_reproduces_the_files_and_answers_are_verified(smollm2):
    rg = pytest.importorskip("reasoning_gym")
    train = _rows("train")
    sample = build_reasoning_prefs.build_split(1234, 4, smollm2, 192, set())
    for t, task in enumerate(build_reasoning_prefs.TASKS):
        assert sample[4 * t : 4 * t + 4] == train[1000 * t : 1000 * t + 4]
        ds = rg.create_dataset(task, size=16, seed=1234 + t)
        entries = {e["question"]: e for e in ds}
        for row in sample[4 * t : 4 * t + 4]:
            entry = entries[row["prompt"][1]["content"]]
            assert ds.score_answer(_answer(row["chosen"]), entry) == 1.0
            assert ds.score_answer(_answer(row["rejected"]), entry) < 1.0


def test_fits_the_default_length_without_truncation(smollm2):
    c = default_data_config()
    c.max_length = 192
    c.on_bad_row = "error"
    s = pipeline.prepare(c, smollm2, split="eval").summary
    assert s.rows_used == 300 and s.prompt_truncated == 0 and s.completion_truncated == 0
    assert s.format == "conversational" and not s.warnings
